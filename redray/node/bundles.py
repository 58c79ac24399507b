"""Placement-group bundles on one node: set aside, then turned into the group's resources.

Phase one (prepare) takes a group's bundles out of the node's free resources if they all
fit now; phase two (commit) adds the group's own resources, under Ray's names, so tasks and
actors of the group can ask for them: `CPU_group_<i>_<id>` (bundle i) and `CPU_group_<id>`
(any bundle), plus `bundle_group_...` markers for requests that need no resource at all.
Removal takes them away and gives the bundles back.
"""

from __future__ import annotations

from redray.node import scheduling
from redray.resources import bundle_offers

Bundle = tuple[int, dict[str, float]]  # (bundle index, resources)

# Removed groups are remembered so that a prepare overtaken by the removal is refused; the
# oldest are forgotten past this many (a prepare is never that late).
REMEMBERED_REMOVALS = 10_000


class Bundles:
    """The placement groups reserved on one node, acting on its resource dicts in place."""

    def __init__(self, total: dict[str, float], available: dict[str, float]):
        self.total = total
        self.available = available
        self.prepared: dict[str, list[Bundle]] = {}
        self.committed: dict[str, list[Bundle]] = {}
        self.removed: dict[str, None] = {}  # insertion-ordered: the oldest go first

    def prepare(self, pg_id: str, bundles: list[Bundle]) -> bool:
        needed = _sum(bundles)
        if pg_id in self.removed or not scheduling.fits(needed, self.available):
            return False
        _add(self.available, needed, -1)
        self.prepared[pg_id] = bundles
        return True

    def commit(self, pg_id: str) -> bool:
        bundles = self.prepared.pop(pg_id, None)
        if bundles is None:
            return False
        self.committed[pg_id] = bundles
        created = group_resources(pg_id, bundles)
        _add(self.total, created, 1)
        _add(self.available, created, 1)
        return True

    def cancel(self, pg_id: str) -> bool:
        bundles = self.prepared.pop(pg_id, None)
        if bundles is None:
            return False
        _add(self.available, _sum(bundles), 1)
        return True

    def remove(self, pg_id: str) -> None:
        """Forget the group (whatever ran in it must already be stopped)."""
        self.removed[pg_id] = None
        if len(self.removed) > REMEMBERED_REMOVALS:
            del self.removed[next(iter(self.removed))]
        self.cancel(pg_id)
        bundles = self.committed.pop(pg_id, None)
        if bundles is None:
            return
        created = group_resources(pg_id, bundles)
        _add(self.total, created, -1)
        _add(self.available, created, -1)
        for name in created:
            if abs(self.total.get(name, 0.0)) < 1e-9:
                self.total.pop(name, None)
                self.available.pop(name, None)
        _add(self.available, _sum(bundles), 1)


def group_resources(pg_id: str, bundles: list[Bundle]) -> dict[str, float]:
    """The resources a committed group adds to its node."""
    created: dict[str, float] = {}
    for index, bundle in bundles:
        for key, amount in bundle_offers(pg_id, index, bundle).items():
            created[key] = created.get(key, 0.0) + amount
    return created


def _sum(bundles: list[Bundle]) -> dict[str, float]:
    total: dict[str, float] = {}
    for _, bundle in bundles:
        for name, amount in bundle.items():
            total[name] = total.get(name, 0.0) + amount
    return total


def _add(target: dict[str, float], amounts: dict[str, float], sign: int) -> None:
    for name, amount in amounts.items():
        target[name] = target.get(name, 0.0) + sign * amount
