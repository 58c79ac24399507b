"""The placement groups a process creates or waits on.

A group is recorded in the GCS with a request for the control loop to reserve it; its state
changes (placed, removed) arrive by pub/sub, and after the subscription was lost (changes
published meanwhile are missed) `resync` re-reads the groups waited on. Tasks and actors run
inside a bundle by asking for the bundle's resources (see redray.resources).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from redray import exceptions
from redray.core.jobs import Jobs
from redray.core.object_io import ObjectIO
from redray.core.object_ref import ObjectRef
from redray.core.serialization import error_payload
from redray.gcs import NAMED_PGS, Gcs


class PlacementGroups:
    """Per-process view of placement groups created or waited on here."""

    def __init__(
        self,
        gcs: Gcs,
        objects: ObjectIO,
        jobs: Jobs,
        worker_id: bytes,
        background: Callable[..., None],
    ):
        self._gcs = gcs
        self._objects = objects
        self._jobs = jobs
        self._worker_id = worker_id
        self._background = background
        self.follow_states: Callable[[], None] = lambda: None  # subscribe to state changes
        self._lock = threading.Lock()
        self._states: dict[str, str] = {}
        self._waiters: dict[str, list[Any]] = {}
        self._removals: list[str] = []  # groups whose removal is not sent yet

    def create(self, bundles: list[dict], strategy: str, name: str, lifetime: str | None) -> bytes:
        """Record a group and ask for it to be placed; its id."""
        pg_id = os.urandom(14)
        pg_hex = pg_id.hex()
        namespace = self._jobs.namespace
        if name:
            claimed = self._gcs.claim_name(NAMED_PGS, namespace, name, pg_hex)
            if claimed != pg_hex:
                raise ValueError(f"A placement group named {name!r} already exists.")
        info = {
            "pg_id": pg_hex,
            "name": name,
            "namespace": namespace,
            "bundles": bundles,
            "strategy": strategy,
            "state": "PENDING",
            "detached": lifetime == "detached",
            "owner": self._worker_id.hex(),
            "job_id": self._jobs.job_id,
            "seq": 0,
        }
        self.follow_states()
        with self._lock:
            self._states[pg_hex] = "PENDING"
        self._gcs.create_placement_group(pg_hex, info)
        return pg_id

    def remove(self, pg_hex: str) -> None:
        """Ask the control loop to remove the group, without waiting (as Ray's). Removals
        asked for in a burst leave together, in order, in one round trip."""
        with self._lock:
            self._removals.append(pg_hex)
            first = len(self._removals) == 1
        if first:
            self._background(self._send_removals)

    def _send_removals(self) -> None:
        with self._lock:
            removals, self._removals = self._removals, []
        if removals:
            self._gcs.push_requests(("remove_pg", {"pg_id": pg_hex}) for pg_hex in removals)

    def on_state(self, info: dict) -> None:
        """A published state change of a group (from the watcher thread)."""
        pg_hex = info["pg_id"]
        with self._lock:
            if pg_hex not in self._states and pg_hex not in self._waiters:
                return
            if info["state"] == "REMOVED":
                self._states.pop(pg_hex, None)  # final: nothing more to track
            else:
                self._states[pg_hex] = info["state"]
            waiters = self._waiters.pop(pg_hex, []) if info["state"] != "PENDING" else []
        for waiter in waiters:
            waiter(info["state"])

    def resync(self) -> None:
        """Re-read the groups waited on (watcher thread, after the state subscription was made
        again: a placement or removal published meanwhile was missed)."""
        with self._lock:
            waited = list(self._waiters)
        if waited:
            self._background(self._reread, waited)

    def _reread(self, pg_hexes: list[str]) -> None:
        for pg_hex in pg_hexes:  # (background thread)
            info = self._gcs.placement_group(pg_hex)
            if info is not None and info.get("state") != "PENDING":
                self.on_state(info)

    def _when_settled(self, pg_hex: str, callback: Any) -> None:
        """callback(state) once the group is placed or removed."""
        self.follow_states()
        with self._lock:
            state = self._states.get(pg_hex)
            if state is None or state == "PENDING":
                self._waiters.setdefault(pg_hex, []).append(callback)
        if state is not None and state != "PENDING":
            callback(state)
        elif state is None:
            # Not created here, so its state changes may predate our subscription.
            info = self._gcs.placement_group(pg_hex)
            if info is not None and info.get("state") != "PENDING":
                self.on_state(info)

    def wait(self, pg_hex: str, timeout: float) -> bool:
        """Block until the group is placed (True) or removed, or timeout passes (False)."""
        done = threading.Event()
        result: list[str] = []

        def settled(state: str) -> None:
            result.append(state)
            done.set()

        self._when_settled(pg_hex, settled)
        done.wait(timeout)
        return bool(result) and result[0] == "CREATED"

    def ready_ref(self, pg_hex: str, placed_value: bytes) -> ObjectRef:
        """A ref whose value, once the group is placed, is `placed_value` (a pickle); a
        removed group's ref raises PlacementGroupSchedulingError."""
        objects = self._objects
        ref = objects.new_ref()
        oid = ref._id

        def settled(state: str) -> None:
            if state == "CREATED":
                objects.set_value(oid, ("v", placed_value, []))
            else:
                error = exceptions.PlacementGroupSchedulingError(
                    f"The placement group {pg_hex} was removed before it was placed."
                )
                objects.set_value(oid, error_payload(error))

        self._when_settled(pg_hex, settled)
        return ref
