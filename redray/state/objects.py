"""Objects, as the processes holding them see them: each raylet asks its workers and
drivers for their reference tables (bounded), and the state client gathers every node's."""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

from redray.core.ids import task_of
from redray.state.schema import ObjectState


def process_objects(refs: Any, mode: str, limit: int) -> list[dict[str, Any]]:
    """(any thread) Up to `limit` objects this process owns or borrows, as ObjectState
    fields (reference type as Ray names it; sizes known for values held here)."""
    with refs.lock:
        entries = list(refs.objects.items())[:limit]
    pid = os.getpid()
    kind = "DRIVER" if mode == "driver" else "WORKER"
    out = []
    for oid, entry in entries:
        value = entry.value
        size = None
        status = "FINISHED" if value is not None else "PENDING"
        if value is not None:
            if value[0] == "v":
                size = len(value[1])
            elif value[0] == "s":
                size = value[2]
            elif value[0] == "e":
                status = "FAILED"
        if value is not None and value[0] == "actor":
            reference = "ACTOR_HANDLE"
        elif entry.count > 0:
            reference = "LOCAL_REFERENCE"
        elif entry.borrowers:
            reference = "USED_BY_PENDING_TASK"
        else:
            reference = "CAPTURED_IN_OBJECT"
        out.append(
            {
                "object_id": oid.hex(),
                "object_size": size,
                "task_status": status,
                "attempt_number": 0,
                "reference_type": reference,
                "call_site": "disabled",
                "type": kind,
                "pid": pid,
                "owned": entry.owner is None,
                "task_id": task_of(oid).hex(),
            }
        )
    return out


def object_state(entry: dict[str, Any]) -> ObjectState:
    return ObjectState(
        object_id=entry["object_id"],
        object_size=entry.get("object_size"),
        task_status=entry.get("task_status"),
        attempt_number=entry.get("attempt_number", 0),
        reference_type=entry.get("reference_type"),
        call_site=entry.get("call_site", "disabled"),
        type=entry.get("type"),
        pid=entry.get("pid"),
        ip=entry.get("ip"),
    )


def summarize(objects: list[ObjectState]) -> dict[str, Any]:
    """Ray's object summary: by call site (only "disabled" here: call sites are not
    recorded), counts and sizes by task state and reference type."""
    groups: dict[str, dict[str, Any]] = {}
    total_size = 0
    for obj in objects:
        group = groups.setdefault(
            obj.call_site or "disabled",
            {
                "total_objects": 0,
                "total_size_mb": 0.0,
                "total_num_workers": set(),
                "total_num_nodes": set(),
                "task_state_counts": defaultdict(int),
                "ref_type_counts": defaultdict(int),
            },
        )
        group["total_objects"] += 1
        size = obj.object_size or 0
        total_size += size
        group["total_size_mb"] += size / 1024 / 1024
        group["total_num_workers"].add(obj.pid)
        group["total_num_nodes"].add(obj.ip)
        group["task_state_counts"][obj.task_status] += 1
        group["ref_type_counts"][obj.reference_type] += 1
    for group in groups.values():
        group["total_num_workers"] = len(group["total_num_workers"])
        group["total_num_nodes"] = len(group["total_num_nodes"])
        group["task_state_counts"] = dict(group["task_state_counts"])
        group["ref_type_counts"] = dict(group["ref_type_counts"])
    return {
        "summary": groups,
        "total_objects": len(objects),
        "total_size_mb": total_size / 1024 / 1024,
        "callsite_enabled": False,
        "summary_by": "callsite",
    }
