"""Task attempts, as the raylets stored them (see events.py and keys.py): list, get,
summarize. Equality filters on indexed columns read that column's index, newest first."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from redray.gcs import Gcs
from redray.state import filters as filters_mod
from redray.state import keys
from redray.state.schema import ListResult, TaskState

PAGE = 1000
_INDEX_COLUMNS = {"state", "job_id", "name", "node_id", "actor_id"}
# Finished attempts are most of what is stored: found by reading `all`, not indexed apart.
_UNINDEXED = {("state", "FINISHED")}
_INT_FIELDS = ("worker_pid", "creation_time_ms", "start_time_ms", "end_time_ms")


def task_state(record: dict[str, Any], detail: bool = True) -> TaskState:
    """A stored attempt as Ray's TaskState."""
    resources = record.get("required_resources")
    if isinstance(resources, str):
        resources = json.loads(resources)
    events = _events(record)
    state = TaskState(
        task_id=record.get("task_id", ""),
        attempt_number=int(record.get("attempt_number", 0)),
        name=record.get("name"),
        state=record.get("state"),
        job_id=record.get("job_id"),
        actor_id=record.get("actor_id"),
        type=record.get("type"),
        func_or_class_name=record.get("name"),
        parent_task_id=record.get("parent_task_id"),
        node_id=record.get("node_id"),
        worker_id=record.get("worker_id"),
        worker_pid=record.get("worker_pid"),
        error_type=record.get("error_type"),
        language=record.get("language", "PYTHON"),
        required_resources=resources,
        runtime_env_info=None,
        placement_group_id=record.get("placement_group_id"),
        events=events,
        profiling_data=None,
        creation_time_ms=record.get("creation_time_ms"),
        start_time_ms=record.get("start_time_ms"),
        end_time_ms=record.get("end_time_ms"),
        task_log_info=None,
        error_message=record.get("error_message"),
        is_debugger_paused=False,
        call_site=None,
        label_selector=None,
    )
    return state if detail else TaskState.brief(state)


_EVENT_TIMES = (
    ("PENDING_ARGS_AVAIL", "creation_time_ms"),
    ("SUBMITTED_TO_WORKER", "submitted_time_ms"),
    ("RUNNING", "start_time_ms"),
)


def _events(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray's `events` (state changes with their times) from a stored attempt's times."""
    events = [
        {"state": state, "created_ms": record[key]}
        for state, key in _EVENT_TIMES
        if record.get(key)
    ]
    if record.get("state") in ("FINISHED", "FAILED") and record.get("end_time_ms"):
        events.append({"state": record["state"], "created_ms": record["end_time_ms"]})
    return events


def dropped_warnings(gcs: Gcs, job_id: str | None = None) -> list[str]:
    """What the task store did not keep, in words (empty when nothing was dropped)."""
    counts = keys.dropped_counts(gcs)
    warnings = []
    if counts.get("retention"):
        warnings.append(
            f"{counts['retention']} older task attempts were dropped past the cluster's cap "
            "(REDRAY_TASK_EVENTS_MAX_TASKS); the newest are kept."
        )
    job_dropped = counts.get(f"job:{job_id}") if job_id else counts.get("job_cap")
    if job_dropped:
        warnings.append(
            f"{job_dropped} older task attempts were dropped past the per-job cap "
            "(REDRAY_TASK_EVENTS_MAX_TASKS_PER_JOB)."
        )
    if counts.get("buffer"):
        warnings.append(
            f"{counts['buffer']} task events were lost before reaching Redis (a process's "
            "buffer was full, REDRAY_TASK_EVENTS_BUFFER, or Redis was unreachable): some "
            "states may be out of date."
        )
    return warnings


def list_tasks(
    gcs: Gcs, filters: list | None = None, limit: int = 100, detail: bool = False
) -> ListResult:
    """Task attempts matching every filter, newest first, at most `limit`."""
    checked = filters_mod.check(filters, TaskState, limit)
    job = next((v for k, p, v in checked if k == "job_id" and p == "="), None)
    warnings = dropped_warnings(gcs, str(job) if job is not None else None)
    total = keys.task_count(gcs)
    task_ids = [str(v) for k, p, v in checked if k == "task_id" and p == "="]
    if task_ids:
        records = keys.read_attempts(gcs, task_ids[0])
        found = [
            t for t in (task_state(r, detail) for r in records) if filters_mod.matches(t, checked)
        ]
        found.reverse()
        return ListResult(found[:limit], total, len(found), warnings)
    candidates = [
        keys.index_key(gcs, k, filters_mod.normalized(k, v))
        for k, p, v in checked
        if p == "=" and k in _INDEX_COLUMNS and (k, filters_mod.normalized(k, v)) not in _UNINDEXED
    ]
    if candidates:
        sizes = keys.index_sizes(gcs, candidates)
        size, index = min(zip(sizes, candidates, strict=True))
    else:
        index, size = keys.index_key(gcs, "all"), total
    found: list[TaskState] = []
    exhausted = False
    for page in _pages(gcs, index, max(PAGE, limit)):
        for record in page:
            task = task_state(record, detail=True)
            if filters_mod.matches(task, checked):
                found.append(task if detail else TaskState.brief(task))
                if len(found) >= limit:
                    break
        if len(found) >= limit:
            break
    else:
        exhausted = True
    num_filtered = len(found) if exhausted else None
    exact = keys.index_is_exact(keys.index_name(gcs, index))
    if num_filtered is None and len(checked) <= 1 and exact:
        num_filtered = size
    return ListResult(found, total, num_filtered, warnings)


def _pages(gcs: Gcs, index: str, page: int) -> Iterator[list[dict[str, Any]]]:
    """The records of an index's attempts, newest first, each once, in pages of at most
    `page` (a list's segments are read a few at a time, more as the reading goes on)."""
    scored = keys.is_scored_key(gcs, index)
    positions = page if scored else 2
    seen: set[tuple[str, int]] = set()
    pending: list[dict[str, Any]] = []
    start = 0
    more = True
    while True:
        while more and len(pending) < page:
            records, read = keys.index_page(gcs, index, start, positions)
            more = read == positions
            start += read
            if not scored:
                positions = min(positions * 2, 64)
            for record in records:
                attempt = (record.get("task_id", ""), record.get("attempt_number", 0))
                if attempt not in seen:
                    seen.add(attempt)
                    pending.append(record)
        if not pending:
            return
        yield pending[:page]
        del pending[:page]


def get_task(gcs: Gcs, task_id: str) -> TaskState | None:
    """The latest stored attempt of a task (hex id), or None."""
    records = keys.read_attempts(gcs, task_id)
    return task_state(records[-1]) if records else None


def all_tasks(gcs: Gcs, most: int | None = None) -> list[dict[str, Any]]:
    """Every stored attempt's record (newest first), for summaries and the timeline."""
    records: list[dict[str, Any]] = []
    for page in _pages(gcs, keys.index_key(gcs, "all"), PAGE * 5):
        records.extend(page)
        if most is not None and len(records) >= most:
            return records[:most]
    return records


def summarize_tasks(gcs: Gcs) -> dict[str, Any]:
    """Ray's task summary: counts by function or class name and state."""
    summary: dict[str, dict[str, Any]] = {}
    total_tasks = total_actor_tasks = 0
    for record in all_tasks(gcs):
        name = record.get("name") or record.get("func_or_class_name") or "?"
        kind = record.get("type", "NORMAL_TASK")
        entry = summary.setdefault(
            name, {"func_or_class_name": name, "type": kind, "state_counts": {}}
        )
        state = record.get("state", "NIL")
        entry["state_counts"][state] = entry["state_counts"].get(state, 0) + 1
        if kind == "ACTOR_TASK":
            total_actor_tasks += 1
        else:
            total_tasks += 1
    return {
        "summary": summary,
        "total_tasks": total_tasks,
        "total_actor_tasks": total_actor_tasks,
        "total_actor_scheduled": 0,
        "summary_by": "func_name",
    }
