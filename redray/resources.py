"""Names of resources, shared by those who ask for them and the raylets that grant them.

A committed placement group adds resources to its node under Ray's names: `CPU_group_<i>_<id>`
for bundle i, `CPU_group_<id>` for any bundle of the group, and a `bundle_group_...` marker
for requests that need no resource at all (a task with num_cpus=0 in a bundle).
"""

from __future__ import annotations

import re

BUNDLE_MARKER = "bundle"
BUNDLE_MARKER_AMOUNT = 1000.0  # offered by every bundle; a request takes 0.001 of it
_INDEXED = re.compile(r"^(.+)_group_(\d+)_([0-9a-zA-Z]+)$")
_WILDCARD = re.compile(r"^(.+)_group_([0-9a-zA-Z]+)$")


def bundle_resources(resources: dict[str, float], pg_hex: str, index: int) -> dict[str, float]:
    """A request rewritten to draw from a placement group's bundle `index` (-1: any)."""
    suffix = f"{index}_{pg_hex}" if index >= 0 else pg_hex
    rewritten = {f"{name}_group_{suffix}": amount for name, amount in resources.items()}
    if not rewritten:
        rewritten[f"{BUNDLE_MARKER}_group_{suffix}"] = 0.001
    return rewritten


def bundle_offers(pg_id: str, index: int, bundle: dict[str, float]) -> dict[str, float]:
    """The resources bundle `index` of a committed group adds to its node."""
    offered: dict[str, float] = {}
    for name, amount in [*bundle.items(), (BUNDLE_MARKER, BUNDLE_MARKER_AMOUNT)]:
        for key in (f"{name}_group_{index}_{pg_id}", f"{name}_group_{pg_id}"):
            offered[key] = offered.get(key, 0.0) + amount
    return offered


def placement_group_of(resource: str) -> str | None:
    """The placement group id a resource name belongs to (`CPU_group_1_<id>`), if any."""
    if "_group_" not in resource:
        return None
    return resource.rsplit("_group_", 1)[1].split("_")[-1]


def plain_name(resource: str) -> str | None:
    """The name a bundle resource was asked for by (`CPU` for `CPU_group_1_<id>`), the name
    itself if it is no bundle's, None for a group's marker."""
    match = _INDEXED.match(resource) or _WILDCARD.match(resource)
    if match is None:
        return resource
    name = match.group(1)
    return None if name == BUNDLE_MARKER else name
