"""Actors, nodes, jobs and placement groups, read from the GCS tables as Ray's records."""

from __future__ import annotations

from collections import Counter
from typing import Any

from redray import gcs as gcs_schema
from redray.gcs import Gcs
from redray.state import filters as filters_mod
from redray.state.schema import (
    ActorState,
    JobState,
    ListResult,
    NodeState,
    PlacementGroupState,
)


def _ms(seconds: Any) -> int | None:
    return int(float(seconds) * 1000) if seconds else None


def actor_state(info: dict[str, Any]) -> ActorState:
    cause = info.get("death_cause")
    strategy = info.get("strategy") or {}
    return ActorState(
        actor_id=info.get("actor_id", ""),
        class_name=info.get("class_name"),
        state=info.get("state"),
        job_id=info.get("job_id"),
        name=info.get("name") or "",
        node_id=info.get("node_id"),
        pid=info.get("pid"),
        ray_namespace=info.get("namespace"),
        serialized_runtime_env="{}",
        required_resources=info.get("placement_resources") or info.get("resources") or {},
        death_cause={"actor_died_error_context": {"error_message": cause}} if cause else None,
        is_detached=bool(info.get("detached")),
        placement_group_id=strategy.get("pg_id") if isinstance(strategy, dict) else None,
        repr_name="",
        num_restarts=int(info.get("num_restarts", 0)),
        num_restarts_due_to_lineage_reconstruction=0,
        call_site=None,
    )


def node_state(info: dict[str, Any]) -> NodeState:
    alive = bool(info.get("alive"))
    return NodeState(
        node_id=info.get("node_id", ""),
        node_ip=info.get("node_ip_address"),
        is_head_node=bool(info.get("is_head")),
        state="ALIVE" if alive else "DEAD",
        state_message=None if alive else info.get("cause") or info.get("death_cause"),
        node_name=info.get("node_ip_address"),
        resources_total=info.get("resources") or {},
        labels={},
        start_time_ms=_ms(info.get("start_time")),
        end_time_ms=None if alive else _ms(info.get("dead_time") or info.get("end_time")),
    )


_JOB_STATUS = {"RUNNING": "RUNNING", "FINISHED": "SUCCEEDED", "FAILED": "FAILED"}


def job_state(job_id: str, info: dict[str, Any]) -> JobState:
    address = info.get("driver_address") or [None]
    return JobState(
        job_id=job_id,
        submission_id=None,
        entrypoint="",
        type="DRIVER",
        status=_JOB_STATUS.get(info.get("state", ""), info.get("state")),
        message=None,
        error_type=None,
        driver_info={
            "id": job_id,
            "node_ip_address": address[0],
            "pid": str(info.get("driver_pid")),
        },
        start_time=_ms(info.get("start_time")),
        end_time=_ms(info.get("end_time")),
        metadata=info.get("metadata") or {},
        runtime_env=info.get("runtime_env") or {},
        driver_node_id=info.get("driver_node_id"),
        driver_exit_code=None,
    )


def pg_state(info: dict[str, Any]) -> PlacementGroupState:
    nodes = info.get("bundle_nodes") or []
    bundles = [
        {"bundle_id": i, "node_id": nodes[i] if i < len(nodes) else None, "unit_resources": b}
        for i, b in enumerate(info.get("bundles") or [])
    ]
    return PlacementGroupState(
        placement_group_id=info.get("pg_id", ""),
        name=info.get("name") or "",
        creator_job_id=info.get("job_id"),
        state=info.get("state"),
        bundles=bundles,
        is_detached=bool(info.get("detached")),
        stats={"scheduling_strategy": info.get("strategy")},
    )


def _listed(records: list[Any], schema: type, filters: list | None, limit: int, detail: bool):
    checked = filters_mod.check(filters, schema, limit)
    matching = [r for r in records if filters_mod.matches(r, checked)]
    items = matching[:limit]
    if not detail:
        items = [schema.brief(r) for r in items]
    return ListResult(items, len(records), len(matching))


def actors(gcs: Gcs) -> list[ActorState]:
    return [actor_state(info) for info in gcs.table_all(gcs_schema.ACTORS).values()]


def list_actors(gcs: Gcs, filters=None, limit: int = 100, detail: bool = False) -> ListResult:
    return _listed(actors(gcs), ActorState, filters, limit, detail)


def get_actor(gcs: Gcs, actor_id: str) -> ActorState | None:
    info = gcs.actor(actor_id)
    return actor_state(info) if info else None


def nodes(gcs: Gcs) -> list[NodeState]:
    return [node_state(info) for info in gcs.nodes()]


def list_nodes(gcs: Gcs, filters=None, limit: int = 100, detail: bool = False) -> ListResult:
    return _listed(nodes(gcs), NodeState, filters, limit, detail)


def get_node(gcs: Gcs, node_id: str) -> NodeState | None:
    return next((n for n in nodes(gcs) if n.node_id == node_id), None)


def jobs(gcs: Gcs) -> list[JobState]:
    return [job_state(job_id, info) for job_id, info in sorted(gcs.jobs().items())]


def list_jobs(gcs: Gcs, filters=None, limit: int = 100, detail: bool = False) -> ListResult:
    return _listed(jobs(gcs), JobState, filters, limit, detail)


def get_job(gcs: Gcs, job_id: str) -> JobState | None:
    return next((j for j in jobs(gcs) if j.job_id == job_id), None)


def placement_groups(gcs: Gcs) -> list[PlacementGroupState]:
    return [pg_state(info) for info in gcs.table_all(gcs_schema.PLACEMENT_GROUPS).values()]


def list_placement_groups(
    gcs: Gcs, filters=None, limit: int = 100, detail: bool = False
) -> ListResult:
    return _listed(placement_groups(gcs), PlacementGroupState, filters, limit, detail)


def get_placement_group(gcs: Gcs, pg_id: str) -> PlacementGroupState | None:
    info = gcs.placement_group(pg_id)
    return pg_state(info) if info else None


def summarize_actors(gcs: Gcs) -> dict[str, Any]:
    """Ray's actor summary: counts by class name and state."""
    summary: dict[str, dict[str, Any]] = {}
    all_actors = actors(gcs)
    for actor in all_actors:
        entry = summary.setdefault(
            actor.class_name or "?", {"class_name": actor.class_name, "state_counts": Counter()}
        )
        entry["state_counts"][actor.state] += 1
    for entry in summary.values():
        entry["state_counts"] = dict(entry["state_counts"])
    return {"summary": summary, "total_actors": len(all_actors), "summary_by": "class"}
