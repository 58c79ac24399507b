"""Placement groups: reserve bundles of resources across nodes, all or nothing.

`placement_group()` records the group in the GCS and asks the control loop to reserve it (a
two-phase prepare/commit over the chosen nodes); it returns at once. `ready()` and `wait()`
follow the group's state on its pub/sub channel. Tasks and actors run inside a bundle through
`PlacementGroupSchedulingStrategy`, which turns their resource request into the bundle's
resources (Ray's names: `CPU_group_<i>_<id>`, `CPU_group_<id>`).
"""

from __future__ import annotations

import numbers
import pickle
from typing import Any

from redray.core import context
from redray.gcs import NAMED_PGS, PLACEMENT_GROUPS
from redray.resources import bundle_resources

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")

__all__ = [
    "PlacementGroup",
    "PlacementGroupID",
    "bundle_resources",
    "get_current_placement_group",
    "get_placement_group",
    "placement_group",
    "placement_group_table",
    "remove_placement_group",
]


class PlacementGroupID:
    """A placement group's id."""

    def __init__(self, binary: bytes):
        self._binary = binary

    def binary(self) -> bytes:
        return self._binary

    def hex(self) -> str:
        return self._binary.hex()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PlacementGroupID) and other._binary == self._binary

    def __hash__(self) -> int:
        return hash(self._binary)

    def __repr__(self) -> str:
        return f"PlacementGroupID({self.hex()})"


class PlacementGroup:
    """A handle to a placement group."""

    def __init__(self, id: PlacementGroupID, bundle_specs: list[dict] | None = None):
        self.id = id
        self._bundles = bundle_specs

    @property
    def bundle_specs(self) -> list[dict[str, float]]:
        if self._bundles is None:
            info = context.worker().gcs.placement_group(self.id.hex()) or {}
            self._bundles = info.get("bundles", [])
        return self._bundles

    @property
    def bundle_count(self) -> int:
        return len(self.bundle_specs)

    @property
    def is_empty(self) -> bool:
        return not self.id.binary()

    def ready(self) -> Any:
        """An ObjectRef that becomes ready (with this group) once the group is placed."""
        placed = pickle.dumps(self, protocol=5)
        return context.worker().placement_groups.ready_ref(self.id.hex(), placed)

    def wait(self, timeout_seconds: float | int = 30) -> bool:
        """Block until the group is placed or timeout_seconds pass; True when placed."""
        return context.worker().placement_groups.wait(self.id.hex(), timeout_seconds)

    def __reduce__(self):
        return (PlacementGroup, (self.id, self._bundles))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PlacementGroup) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"PlacementGroup({self.id.hex()})"


def validate_bundles(bundles: Any) -> list[dict[str, float]]:
    if not isinstance(bundles, list):
        raise ValueError("The type of bundles must be list, got " + str(type(bundles)))
    if not bundles:
        raise ValueError("The placement group `bundles` argument cannot contain an empty list")
    result = []
    for bundle in bundles:
        if not isinstance(bundle, dict):
            raise ValueError(
                "Bundles must be a list of dictionaries: got a bundle of type "
                f"{type(bundle).__name__}"
            )
        for name, amount in bundle.items():
            if not isinstance(name, str):
                raise ValueError(f"Bundle resource names must be strings, got {name!r}")
            if not isinstance(amount, numbers.Number) or isinstance(amount, bool) or amount < 0:
                raise ValueError(
                    f"Bundle resource quantities must be non-negative numbers, got {name}: "
                    f"{amount!r}"
                )
        if not any(amount > 0 for amount in bundle.values()):
            raise ValueError(
                "Bundles cannot be an empty dictionary or resources with only 0 values. "
                f"Bundles: {bundles}"
            )
        result.append({name: float(amount) for name, amount in bundle.items() if amount > 0})
    return result


def placement_group(
    bundles: list[dict[str, float]],
    strategy: str = "PACK",
    name: str = "",
    lifetime: str | None = None,
    _max_cpu_fraction_per_node: float | None = None,
    _soft_target_node_id: str | None = None,
    bundle_label_selector: Any = None,
) -> PlacementGroup:
    """Reserve `bundles` with `strategy`; returns at once (use ready()/wait())."""
    specs = validate_bundles(bundles)
    if strategy not in STRATEGIES:
        raise ValueError(
            f"Invalid placement group strategy {strategy}. Supported strategies are: "
            f"{list(STRATEGIES)}."
        )
    if lifetime not in (None, "detached"):
        raise ValueError(
            "Placement group `lifetime` argument must be either `None` or 'detached'. "
            f"Got {lifetime}."
        )
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    pg_id = context.worker().placement_groups.create(specs, strategy, name, lifetime)
    return PlacementGroup(PlacementGroupID(pg_id), specs)


def remove_placement_group(placement_group: PlacementGroup) -> None:
    """Release the group's resources; tasks and actors running in it are stopped."""
    if not isinstance(placement_group, PlacementGroup):
        raise TypeError(f"Expected a PlacementGroup, got {type(placement_group).__name__}")
    context.worker().placement_groups.remove(placement_group.id.hex())


def get_placement_group(placement_group_name: str) -> PlacementGroup:
    """The live placement group with this name (in this job's namespace)."""
    if not placement_group_name:
        raise ValueError("Please supply a non-empty value to get_placement_group")
    worker = context.worker()
    pg_hex = worker.gcs.lookup_name(NAMED_PGS, worker.namespace, placement_group_name)
    info = worker.gcs.placement_group(pg_hex) if pg_hex else None
    if info is None or info.get("state") == "REMOVED":
        raise ValueError(f"Failed to look up placement group with name: {placement_group_name}")
    return PlacementGroup(PlacementGroupID(bytes.fromhex(pg_hex)), info["bundles"])


def placement_group_table(placement_group: PlacementGroup | None = None) -> dict:
    """The GCS view of one placement group, or of all of them by id."""
    worker = context.worker()

    def view(pg_hex: str, info: dict) -> dict:
        return {
            "placement_group_id": pg_hex,
            "name": info.get("name", ""),
            "bundles": dict(enumerate(info.get("bundles", []))),
            "bundles_to_node_id": dict(enumerate(info.get("bundle_nodes") or [])),
            "strategy": info.get("strategy"),
            "state": info.get("state"),
        }

    if placement_group is not None:
        pg_hex = placement_group.id.hex()
        return view(pg_hex, worker.gcs.placement_group(pg_hex) or {})
    return {k: view(k, v) for k, v in worker.gcs.table_all(PLACEMENT_GROUPS).items()}


def get_current_placement_group() -> PlacementGroup | None:
    """The placement group the calling task or actor runs in, if any."""
    ctx = context.worker().jobs.current_task()
    pg_hex = ((ctx.grant if ctx is not None else None) or {}).get("pg_id")
    if not pg_hex:
        return None
    return PlacementGroup(PlacementGroupID(bytes.fromhex(pg_hex)))
