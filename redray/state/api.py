"""The state API with Ray's names and signatures (`ray.util.state`): list, get and summarize
the cluster's tasks, actors, objects, nodes, jobs, placement groups and workers, and read its
logs. Each call reads Redis (and, for workers, objects and logs, asks the nodes), so it
works from a driver, from a task, or from any machine that reaches the cluster's Redis
(`address="redis://..."`).

What is missing from an answer is said: a RayStateApiException when a data source did not
answer and raise_on_missing_output is True (a UserWarning otherwise), and a UserWarning for
task attempts the store dropped past its caps and for lists cut at `limit`.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Callable, Generator, Iterator
from typing import Any

from redray.gcs import Gcs
from redray.state import cluster, keys, objects, tasks, timeline
from redray.state import filters as filters_mod
from redray.state.client import (
    DEFAULT_TIMEOUT_SECONDS,
    NodeClient,
    RayStateApiException,
    connect,
    live_nodes,
)
from redray.state.filters import check
from redray.state.node_service import MAX_LIMIT
from redray.state.schema import (
    ActorState,
    JobState,
    ListResult,
    NodeState,
    ObjectState,
    PlacementGroupState,
    TaskState,
    WorkerState,
)

__all__ = [
    "RayStateApiException",
    "get_actor",
    "get_job",
    "get_log",
    "get_node",
    "get_objects",
    "get_placement_group",
    "get_task",
    "get_worker",
    "list_actors",
    "list_jobs",
    "list_logs",
    "list_nodes",
    "list_objects",
    "list_placement_groups",
    "list_tasks",
    "list_workers",
    "summarize_actors",
    "summarize_objects",
    "summarize_tasks",
]

Filters = list[tuple[str, str, Any]] | None


@contextlib.contextmanager
def _gcs(address: str | None) -> Iterator[Gcs]:
    gcs, owned = connect(address)
    try:
        yield gcs
    finally:
        if owned:
            gcs.close()


def _report(result: ListResult, resource: str, raise_on_missing_output: bool) -> list[Any]:
    """The items, after saying what is missing (Ray's warnings and exception)."""
    if result.partial_failures:
        message = (
            f"Failed to retrieve all {resource} from the cluster: "
            + "; ".join(result.partial_failures)
            + ". To allow missing output, set `raise_on_missing_output=False`."
        )
        if raise_on_missing_output:
            raise RayStateApiException(message)
        warnings.warn(message, stacklevel=3)
    for text in result.warnings:
        warnings.warn(text, stacklevel=3)
    if result.num_filtered is not None and result.num_filtered > len(result.items):
        warnings.warn(
            f"Limit last {len(result.items)} entries (Total {result.num_filtered}). Use "
            "`--filter` to reduce the amount of data to return or setting a higher limit "
            "with `--limit` to see all data.",
            stacklevel=3,
        )
    return result.items


# -- the Gcs-level calls the CLI and the dashboard use -----------------------------------------
def list_resource(
    gcs: Gcs,
    resource: str,
    filters: Filters = None,
    limit: int = 100,
    detail: bool = False,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> ListResult:
    """List one resource ("tasks", "actors", "objects", "nodes", "jobs",
    "placement_groups", "workers") of the cluster behind `gcs`."""
    if resource == "tasks":
        return tasks.list_tasks(gcs, filters, limit, detail)
    if resource in ("workers", "objects"):
        return _from_nodes(gcs, resource, filters, limit, detail, timeout)
    lister: Callable[..., ListResult] | None = {
        "actors": cluster.list_actors,
        "nodes": cluster.list_nodes,
        "jobs": cluster.list_jobs,
        "placement_groups": cluster.list_placement_groups,
    }.get(resource)
    if lister is None:
        raise ValueError(
            f"unknown resource {resource!r}: use one of tasks, actors, objects, nodes, jobs, "
            "placement_groups, workers"
        )
    return lister(gcs, filters, limit, detail)


def _from_nodes(
    gcs: Gcs, resource: str, filters: Filters, limit: int, detail: bool, timeout: float
) -> ListResult:
    schema = WorkerState if resource == "workers" else ObjectState
    checked = check(filters, schema, limit)
    client = NodeClient(gcs)
    records: list[Any] = []
    failures: list[str] = []
    try:
        for node in live_nodes(gcs):
            try:
                answer = client.query(node, resource, {"limit": None}, timeout)
            except RayStateApiException as exc:
                failures.append(str(exc))
                continue
            if resource == "workers":
                records += [WorkerState(**entry) for entry in answer]
            else:
                records += [objects.object_state(entry) for entry in answer["objects"]]
                if answer["unanswered"]:
                    failures.append(
                        f"{answer['unanswered']} process(es) on node {node['node_id']} did "
                        "not answer in time"
                    )
    finally:
        client.close()
    matching = [r for r in records if filters_mod.matches(r, checked)]
    items = matching[:limit] if detail else [schema.brief(r) for r in matching[:limit]]
    return ListResult(items, len(records), len(matching), partial_failures=failures)


# -- Ray's functions --------------------------------------------------------------------------
def _lister(resource: str) -> Callable[..., list[Any]]:
    def list_function(
        address: str | None = None,
        filters: Filters = None,
        limit: int = 100,
        timeout: int = DEFAULT_TIMEOUT_SECONDS,
        detail: bool = False,
        raise_on_missing_output: bool = True,
        _explain: bool = False,
    ) -> list[Any]:
        with _gcs(address) as gcs:
            result = list_resource(gcs, resource, filters, limit, detail, timeout)
        return _report(result, resource, raise_on_missing_output)

    list_function.__name__ = list_function.__qualname__ = f"list_{resource}"
    list_function.__doc__ = (
        f"List the cluster's {resource.replace('_', ' ')} (Ray's ray.util.state.list_{resource})."
    )
    return list_function


list_tasks = _lister("tasks")
list_actors = _lister("actors")
list_objects = _lister("objects")
list_nodes = _lister("nodes")
list_jobs = _lister("jobs")
list_placement_groups = _lister("placement_groups")
list_workers = _lister("workers")


def get_task(
    id: Any, address: str | None = None, timeout: int = DEFAULT_TIMEOUT_SECONDS, _explain=False
) -> TaskState | None:
    """A task's latest attempt, by hex id or by one of its ObjectRefs."""
    task_id = id.task_id().hex() if hasattr(id, "task_id") else str(id)
    with _gcs(address) as gcs:
        return tasks.get_task(gcs, task_id)


def get_actor(
    id: str, address: str | None = None, timeout: int = DEFAULT_TIMEOUT_SECONDS, _explain=False
) -> ActorState | None:
    with _gcs(address) as gcs:
        return cluster.get_actor(gcs, id)


def get_node(
    id: str, address: str | None = None, timeout: int = DEFAULT_TIMEOUT_SECONDS, _explain=False
) -> NodeState | None:
    with _gcs(address) as gcs:
        return cluster.get_node(gcs, id)


def get_job(
    id: str, address: str | None = None, timeout: int = DEFAULT_TIMEOUT_SECONDS, _explain=False
) -> JobState | None:
    with _gcs(address) as gcs:
        return cluster.get_job(gcs, id)


def get_placement_group(
    id: str, address: str | None = None, timeout: int = DEFAULT_TIMEOUT_SECONDS, _explain=False
) -> PlacementGroupState | None:
    with _gcs(address) as gcs:
        return cluster.get_placement_group(gcs, id)


def get_worker(
    id: str, address: str | None = None, timeout: int = DEFAULT_TIMEOUT_SECONDS, _explain=False
) -> WorkerState | None:
    found = list_workers(
        address, [("worker_id", "=", id)], 1, timeout, detail=True, raise_on_missing_output=False
    )
    return found[0] if found else None


def get_objects(
    id: str, address: str | None = None, timeout: int = DEFAULT_TIMEOUT_SECONDS, _explain=False
) -> list[ObjectState]:
    """Every process's view of one object (its owner's and its borrowers')."""
    return list_objects(
        address, [("object_id", "=", id)], 10_000, timeout, True, raise_on_missing_output=False
    )


def summarize_tasks(
    address: str | None = None,
    timeout: int = DEFAULT_TIMEOUT_SECONDS,
    raise_on_missing_output: bool = True,
    _explain: bool = False,
) -> dict[str, Any]:
    with _gcs(address) as gcs:
        for text in tasks.dropped_warnings(gcs):
            warnings.warn(text, stacklevel=2)
        return {"cluster": tasks.summarize_tasks(gcs)}


def summarize_actors(
    address: str | None = None,
    timeout: int = DEFAULT_TIMEOUT_SECONDS,
    raise_on_missing_output: bool = True,
    _explain: bool = False,
) -> dict[str, Any]:
    with _gcs(address) as gcs:
        return {"cluster": cluster.summarize_actors(gcs)}


def summarize_objects(
    address: str | None = None,
    timeout: int = DEFAULT_TIMEOUT_SECONDS,
    raise_on_missing_output: bool = True,
    _explain: bool = False,
) -> dict[str, Any]:
    found = list_objects(address, None, MAX_LIMIT, timeout, True, raise_on_missing_output)
    return {"cluster": objects.summarize(found)}


# -- logs ---------------------------------------------------------------------------------------
def _node_for(gcs: Gcs, node_id: str | None, node_ip: str | None) -> dict[str, Any]:
    nodes = live_nodes(gcs)
    if node_id is not None:
        found = [n for n in nodes if n["node_id"] == node_id]
    elif node_ip is not None:
        found = [n for n in nodes if n.get("node_ip_address") == node_ip]
    else:
        found = [n for n in nodes if n.get("is_head")] or nodes
    if not found:
        raise ValueError(
            f"no live node {'with id ' + node_id if node_id else 'at ' + str(node_ip)}"
        )
    return found[0]


def list_logs(
    address: str | None = None,
    node_id: str | None = None,
    node_ip: str | None = None,
    glob_filter: str | None = None,
    timeout: int = DEFAULT_TIMEOUT_SECONDS,
) -> dict[str, list[str]]:
    """A node's log files by category (the head node's when no node is given)."""
    with _gcs(address) as gcs:
        return logs_of(gcs, node_id, node_ip, glob_filter, timeout)


def logs_of(
    gcs: Gcs,
    node_id: str | None = None,
    node_ip: str | None = None,
    glob_filter: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> dict[str, list[str]]:
    node = _node_for(gcs, node_id, node_ip)
    client = NodeClient(gcs)
    try:
        return client.query(node, "list_logs", {"glob": glob_filter or "*"}, timeout)
    finally:
        client.close()


def _log_target(
    gcs: Gcs,
    node_id: str | None,
    node_ip: str | None,
    filename: str | None,
    actor_id: str | None,
    task_id: str | None,
    pid: int | None,
    suffix: str,
    attempt_number: int,
) -> tuple[dict[str, Any], str | None, str | None]:
    """(node, file name, glob to find it) of what a get_log call asks for."""
    if actor_id is not None:
        info = gcs.actor(actor_id)
        if info is None or not info.get("node_id"):
            raise ValueError(f"actor {actor_id} is unknown or was never placed on a node")
        return _node_for(gcs, info["node_id"], None), None, f"worker-*-{info.get('pid')}.{suffix}"
    if task_id is not None:
        records = keys.read_attempts(gcs, task_id)
        record = next((r for r in records if r.get("attempt_number") == attempt_number), None)
        record = record or (records[-1] if records else None)
        if record is None or not record.get("worker_id"):
            raise ValueError(f"task {task_id} is unknown or has not run on a worker")
        node = _node_for(gcs, record["node_id"], None)
        return node, None, f"worker-{record['worker_id']}-*.{suffix}"
    node = _node_for(gcs, node_id, node_ip)
    if pid is not None:
        return node, None, f"worker-*-{pid}.{suffix}"
    if filename is None:
        raise ValueError("get_log needs a filename, actor_id, task_id or pid")
    return node, filename, None


def get_log(
    address: str | None = None,
    node_id: str | None = None,
    node_ip: str | None = None,
    filename: str | None = None,
    actor_id: str | None = None,
    task_id: str | None = None,
    pid: int | None = None,
    follow: bool = False,
    tail: int = -1,
    timeout: int = DEFAULT_TIMEOUT_SECONDS,
    suffix: str = "out",
    encoding: str | None = "utf-8",
    errors: str | None = "strict",
    submission_id: str | None = None,
    attempt_number: int = 0,
    _interval: float | None = None,
    filter_ansi_code: bool = False,
) -> Generator[str, None, None]:
    """A log file's text in chunks, fetched from its node's raylet (its last `tail` lines
    when tail >= 0; with follow=True, then what is appended, until the caller stops)."""
    if submission_id is not None:
        raise ValueError("job submission logs are not supported: there is no job submission")
    with _gcs(address) as gcs:
        yield from log_chunks(
            gcs,
            node_id=node_id,
            node_ip=node_ip,
            filename=filename,
            actor_id=actor_id,
            task_id=task_id,
            pid=pid,
            follow=follow,
            tail=tail,
            timeout=timeout,
            suffix=suffix,
            encoding=encoding,
            errors=errors,
            attempt_number=attempt_number,
            interval=_interval,
        )


def log_chunks(
    gcs: Gcs,
    node_id: str | None = None,
    node_ip: str | None = None,
    filename: str | None = None,
    actor_id: str | None = None,
    task_id: str | None = None,
    pid: int | None = None,
    follow: bool = False,
    tail: int = -1,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    suffix: str = "out",
    encoding: str | None = "utf-8",
    errors: str | None = "strict",
    attempt_number: int = 0,
    interval: float | None = None,
) -> Generator[Any, None, None]:
    """get_log on a Gcs (see get_log)."""
    node, name, pattern = _log_target(
        gcs, node_id, node_ip, filename, actor_id, task_id, pid, suffix, attempt_number
    )
    client = NodeClient(gcs)
    try:
        if name is None:
            listed = client.query(node, "list_logs", {"glob": pattern}, timeout)
            names = sorted(n for group in listed.values() for n in group)
            if not names:
                raise ValueError(f"no log file matching {pattern!r} on node {node['node_id']}")
            name = names[-1]
        args: dict[str, Any] = {"filename": name, "tail": tail if tail >= 0 else None}
        while True:
            answer = client.query(node, "read_log", args, timeout)
            data = answer["data"]
            if data:
                yield data.decode(encoding, errors or "strict") if encoding else data
            args = {"filename": name, "offset": answer["offset"]}
            if answer["offset"] < answer["size"]:
                continue
            if not follow:
                return
            time.sleep(interval or 0.5)
    finally:
        client.close()


def write_timeline(filename: str | None = None, address: str | None = None) -> list | None:
    """Ray's `ray.timeline`: the tasks as Chrome trace events, written to `filename` as
    JSON (returned when no filename is given)."""
    with _gcs(address) as gcs:
        trace = timeline.chrome_trace(gcs)
    if filename is None:
        return trace
    with open(filename, "w") as f:
        json.dump(trace, f)
    return None
