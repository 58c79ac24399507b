"""The records the state API returns, with Ray's class and field names (ray.util.state.common).

Each is a dataclass that also reads like a dict (`task["state"]`), as Ray's do. Fields Ray
shows only with `detail=True` are None otherwise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

DETAIL = {"detail": True}


class StateSchema:
    """Dict-style access and conversions shared by every state record."""

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def asdict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def columns(cls, detail: bool = False) -> list[str]:
        """The fields listed by default (detail=False) or all of them."""
        return [
            f.name
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if detail or not f.metadata.get("detail")
        ]

    @classmethod
    def brief(cls, record: Any) -> Any:
        """A copy without the detail-only fields."""
        values = {
            f.name: None if f.metadata.get("detail") else getattr(record, f.name)
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        }
        return cls(**values)


@dataclass
class TaskState(StateSchema):
    task_id: str
    attempt_number: int = 0
    name: str | None = None
    state: str | None = None
    job_id: str | None = None
    actor_id: str | None = None
    type: str | None = None
    func_or_class_name: str | None = None
    parent_task_id: str | None = None
    node_id: str | None = None
    worker_id: str | None = None
    worker_pid: int | None = None
    error_type: str | None = None
    language: str | None = field(default=None, metadata=DETAIL)
    required_resources: dict | None = field(default=None, metadata=DETAIL)
    runtime_env_info: dict | None = field(default=None, metadata=DETAIL)
    placement_group_id: str | None = field(default=None, metadata=DETAIL)
    events: list[dict] | None = field(default=None, metadata=DETAIL)
    profiling_data: dict | None = field(default=None, metadata=DETAIL)
    creation_time_ms: int | None = field(default=None, metadata=DETAIL)
    start_time_ms: int | None = field(default=None, metadata=DETAIL)
    end_time_ms: int | None = field(default=None, metadata=DETAIL)
    task_log_info: dict | None = field(default=None, metadata=DETAIL)
    error_message: str | None = field(default=None, metadata=DETAIL)
    is_debugger_paused: bool | None = field(default=None, metadata=DETAIL)
    call_site: str | None = field(default=None, metadata=DETAIL)
    label_selector: dict | None = field(default=None, metadata=DETAIL)


@dataclass
class ActorState(StateSchema):
    actor_id: str
    class_name: str | None = None
    state: str | None = None
    job_id: str | None = None
    name: str | None = None
    node_id: str | None = None
    pid: int | None = None
    ray_namespace: str | None = None
    serialized_runtime_env: str | None = field(default=None, metadata=DETAIL)
    required_resources: dict | None = field(default=None, metadata=DETAIL)
    death_cause: dict | None = field(default=None, metadata=DETAIL)
    is_detached: bool | None = field(default=None, metadata=DETAIL)
    placement_group_id: str | None = field(default=None, metadata=DETAIL)
    repr_name: str | None = field(default=None, metadata=DETAIL)
    num_restarts: int | None = field(default=None, metadata=DETAIL)
    num_restarts_due_to_lineage_reconstruction: int | None = field(default=None, metadata=DETAIL)
    call_site: str | None = field(default=None, metadata=DETAIL)


@dataclass
class ObjectState(StateSchema):
    object_id: str
    object_size: int | None = None
    task_status: str | None = None
    attempt_number: int | None = None
    reference_type: str | None = None
    call_site: str | None = None
    type: str | None = None
    pid: int | None = None
    ip: str | None = None


@dataclass
class NodeState(StateSchema):
    node_id: str
    node_ip: str | None = None
    is_head_node: bool | None = None
    state: str | None = None
    state_message: str | None = None
    node_name: str | None = None
    resources_total: dict | None = None
    labels: dict | None = None
    start_time_ms: int | None = field(default=None, metadata=DETAIL)
    end_time_ms: int | None = field(default=None, metadata=DETAIL)


@dataclass
class JobState(StateSchema):
    job_id: str
    submission_id: str | None = None
    entrypoint: str | None = None
    type: str | None = None
    status: str | None = None
    message: str | None = None
    error_type: str | None = None
    driver_info: dict | None = None
    start_time: int | None = field(default=None, metadata=DETAIL)
    end_time: int | None = field(default=None, metadata=DETAIL)
    metadata: dict | None = field(default=None, metadata=DETAIL)
    runtime_env: dict | None = field(default=None, metadata=DETAIL)
    driver_node_id: str | None = field(default=None, metadata=DETAIL)
    driver_exit_code: int | None = field(default=None, metadata=DETAIL)


@dataclass
class WorkerState(StateSchema):
    worker_id: str
    is_alive: bool | None = None
    worker_type: str | None = None
    exit_type: str | None = None
    node_id: str | None = None
    ip: str | None = None
    pid: int | None = None
    exit_detail: str | None = field(default=None, metadata=DETAIL)
    worker_launch_time_ms: int | None = field(default=None, metadata=DETAIL)
    worker_launched_time_ms: int | None = field(default=None, metadata=DETAIL)
    start_time_ms: int | None = field(default=None, metadata=DETAIL)
    end_time_ms: int | None = field(default=None, metadata=DETAIL)


@dataclass
class PlacementGroupState(StateSchema):
    placement_group_id: str
    name: str | None = None
    creator_job_id: str | None = None
    state: str | None = None
    bundles: list[dict] | None = field(default=None, metadata=DETAIL)
    is_detached: bool | None = field(default=None, metadata=DETAIL)
    stats: dict | None = field(default=None, metadata=DETAIL)


@dataclass
class ListResult:
    """What a list call found: the records, and what the caller should be told about what
    is missing (Ray's ListApiResponse counters and warnings)."""

    items: list[Any]
    total: int  # entries stored at the source (before filters)
    num_filtered: int | None  # entries matching the filters (None: more than were read)
    warnings: list[str] = field(default_factory=list)
    partial_failures: list[str] = field(default_factory=list)  # unreachable data sources
