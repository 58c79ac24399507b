"""Task events: each process records its tasks' state changes; raylets write them to Redis.

What a task or actor call costs its owner is one row, when it ends: its submission, push,
start (reported by the executing worker with the reply it sends anyway), end, worker and
node, appended to the columns of its function (columns.Ended; a failure is an event tuple).
Work still pending or running after one report interval is also reported as it is then:
owners report their tasks still pending, workers the calls they have been running that
long, so `list_tasks(filters=[("state", "=", "RUNNING")])` shows them. A process records
into bounded buffers (counting what it had to drop); a timer ships them to the process's
raylet every interval over the connection it already has, one message per interval. Each
raylet stores the columns as pieces, merges the other events into one record per task
attempt, and writes them with one script call per interval from its own thread (see
keys.write_task_events): the task hot path never waits on Redis.

Settings (environment of the processes and of `redray start`/`redray node`):
- REDRAY_TASK_EVENTS=0 (or Ray's RAY_task_events_report_interval_ms=0): record nothing;
- REDRAY_TASK_EVENTS_INTERVAL_MS / RAY_task_events_report_interval_ms: how often (1000, as
  Ray);
- REDRAY_TASK_EVENTS_BUFFER: events a process holds before dropping (100,000);
- REDRAY_TASK_EVENTS_MAX_TASKS / RAY_task_events_max_num_task_in_gcs: attempts kept in Redis
  for the cluster (100,000); REDRAY_TASK_EVENTS_MAX_TASKS_PER_JOB: per job (100,000).
"""

from __future__ import annotations

import collections
import json
import logging
import operator
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from redray.state import columns, keys

log = logging.getLogger(__name__)

# Event kinds (the first item of an event tuple).
# (PENDING, task_id, attempt, created, name, job_id, actor_id, parent, resources, state)
PENDING = 0
PUSHED = 1  # (PUSHED, task_id, attempt, time)
RUNNING = 2  # (RUNNING, task_id, attempt, started, name, job_id) from the executing worker
# (FINISHED|FAILED, task_id, attempt, created, pushed, ended, name, job_id, actor_id, parent,
#  resources, run, error, reported): run is what the worker replied (started, reported
#  running, node_id, worker_id, pid) or None; error an error payload (tuple) or
#  [error_type, message]; reported: the owner reported the attempt pending before.
FINISHED = 4
FAILED = 5
_KIND = operator.itemgetter(0)
WALL_OFFSET = time.time() - time.monotonic()  # monotonic + WALL_OFFSET: wall-clock time

# Ray's ErrorType names for redray's exception classes (by class name, most specific first).
_ERROR_TYPES = {
    "TaskCancelledError": "TASK_CANCELLED",
    "WorkerCrashedError": "WORKER_DIED",
    "ActorDiedError": "ACTOR_DIED",
    "ActorUnavailableError": "ACTOR_UNAVAILABLE",
    "RayActorError": "ACTOR_DIED",
    "ObjectLostError": "OBJECT_LOST",
    "OwnerDiedError": "OWNER_DIED",
    "LocalRayletDiedError": "LOCAL_RAYLET_DIED",
    "NodeDiedError": "NODE_DIED",
    "OutOfMemoryError": "OUT_OF_MEMORY",
    "RayTaskError": "TASK_EXECUTION_EXCEPTION",
}
MAX_ERROR_MESSAGE = 4096
MAX_ATTEMPT = 1 << (8 * columns.ATTEMPT_BYTES)  # (attempts past it are stored one by one)


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        raw = os.environ.get(name)
        if raw is not None and raw.strip():
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    return default


def enabled() -> bool:
    """Whether this process records task events (read once, at process start)."""
    if os.environ.get("REDRAY_TASK_EVENTS", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return report_interval() > 0


def report_interval() -> float:
    """Seconds between shipments of a process's events."""
    ms = _env_int(("REDRAY_TASK_EVENTS_INTERVAL_MS", "RAY_task_events_report_interval_ms"), 1000)
    return ms / 1000.0


def buffer_capacity() -> int:
    return max(1, _env_int(("REDRAY_TASK_EVENTS_BUFFER",), 100_000))


def max_tasks() -> int:
    return max(
        1,
        _env_int(("REDRAY_TASK_EVENTS_MAX_TASKS", "RAY_task_events_max_num_task_in_gcs"), 100_000),
    )


def max_tasks_per_job() -> int:
    return max(1, _env_int(("REDRAY_TASK_EVENTS_MAX_TASKS_PER_JOB",), 100_000))


def error_type_of(error: BaseException) -> str:
    for cls in type(error).__mro__:
        found = _ERROR_TYPES.get(cls.__name__)
        if found is not None:
            return found
    return type(error).__name__


class TaskEventRecorder:
    """A process's buffer of task events (any thread records; the reactor thread ships).

    Most calls end with their worker's reply: those are gathered as columns per function
    (`ended`, columns.Ended), so nothing of a call outlives it until the shipment; the
    rest are event tuples. `ship(events, ended, dropped)` runs on the reactor thread at most
    once per interval with what was recorded since; `describe_error(payload)` turns a
    failure's pickled error into (error_type, message) there, off the task's path.

    Work still pending after an interval is found without holding on to each task: task ids
    are made in counter order, so `issued()` at each tick marks what was submitted before
    it, and at the tick after next `still_pending(low, high, retried)` (reactor thread)
    returns those of the tasks numbered low+1..high (and of the retried ones) not finished.
    `running()` returns the calls this process has been running for an interval."""

    def __init__(
        self,
        call_later: Callable[[float, Callable], None],
        ship: Callable[[list, list, int], None],
        describe_error: Callable[[Any], tuple[str, str]],
        interval: float | None = None,
        capacity: int | None = None,
    ):
        self._call_later = call_later
        self._ship = ship
        self._describe_error = describe_error
        self.interval = report_interval() if interval is None else interval
        self.capacity = buffer_capacity() if capacity is None else capacity
        self._events: collections.deque = collections.deque()
        self._lock = threading.Lock()  # guards _ended, _ended_rows and _last
        self._ended: dict[tuple, columns.Ended] = {}  # (name, job, actor, resources, reported)
        self._ended_rows = 0
        self._last: tuple | None = None  # (options, job, actor, reported, its columns)
        self._armed = False
        self.dropped = 0  # since the last shipment
        self.issued: Callable[[], int] | None = None
        self.still_pending: Callable[[int, int, list], list[tuple[Any, str]]] | None = None
        self.running: Callable[[], tuple[list[tuple], bool]] | None = None
        self._marks = (0, 0)  # issued() at the tick before last and at the last one
        # Tasks tried again since the last tick, and those of the tick before.
        self.retried: list = []
        self._aging_retried: list = []

    def arm(self) -> None:
        """Make sure a tick comes (any thread; cheap when one is due)."""
        if not self._armed:
            self._armed = True
            self._call_later(self.interval, self.tick)

    def add(self, event: tuple) -> None:
        events = self._events
        if len(events) >= self.capacity:
            self.dropped += 1
            return
        events.append(event)
        if not self._armed:
            self._armed = True
            self._call_later(self.interval, self.tick)

    def ended(self, task: Any, error: Any) -> None:
        """(any thread) A task attempt ended (error: an error payload, [type, message], or
        None when it succeeded)."""
        run = task.run
        attempt = task.attempt
        if error is not None or run is None or attempt >= MAX_ATTEMPT:
            self.add(done_event(task, error))
            return
        now = time.time()
        options, job, actor = task.options, task.job, task.actor
        reported = task.reported or run[1]
        with self._lock:
            if self._ended_rows >= self.capacity:
                self.dropped += 1
                return
            self._ended_rows += 1
            last = self._last
            if (
                last is not None
                and last[0] is options
                and last[1] is job
                and last[2] is actor
                and last[3] == reported
            ):
                group = last[4]
            else:
                group = self._group(options, job, actor, reported)
            pushed = task.pushed
            group.add(
                task.task_id,
                attempt,
                task.created,
                pushed + WALL_OFFSET if pushed else 0.0,
                now,
                run,
                task.parent,
            )
        if not self._armed:
            self._armed = True
            self._call_later(self.interval, self.tick)

    def _group(self, options: Any, job: Any, actor: Any, reported: bool) -> columns.Ended:
        """(lock held) The columns of the calls of this function, job and actor ended since
        the last shipment; remembered as the last used (calls of one come in runs)."""
        actor_id = actor.actor_id if actor is not None else None
        # (the group holds the resources: their id stays theirs while it is in the key)
        key = (options.name, job.job_id, actor_id, id(options.resources), reported)
        group = self._ended.get(key)
        if group is None:
            group = self._ended[key] = columns.Ended(
                options.name, job.job_id, actor_id, options.resources, reported
            )
        self._last = (options, job, actor, reported, group)
        return group

    def take(self) -> tuple[list, list, int]:
        """Everything recorded so far (event tuples, failures described; columns.Ended of
        calls that ended with their worker's reply); and how many were dropped."""
        events = self._events
        taken = [events.popleft() for _ in range(len(events))]
        with self._lock:
            ended = list(self._ended.values())
            self._ended = {}
            self._ended_rows = 0
            self._last = None
        dropped, self.dropped = self.dropped, 0
        if FAILED not in map(_KIND, taken):
            return taken, ended, dropped
        for i, event in enumerate(taken):
            if event[0] == FAILED and type(event[12]) is tuple:  # an error payload
                try:
                    described = list(self._describe_error(event[12]))
                except Exception as exc:  # an error that cannot be unpickled here
                    described = [type(exc).__name__, f"(error not readable here: {exc})"]
                taken[i] = (*event[:12], described, *event[13:])
        return taken, ended, dropped

    def tick(self) -> None:
        """(reactor thread) Report what has been pending or running for an interval, then
        ship what was recorded; come again while anything may need reporting."""
        self._armed = False
        try:
            if self.still_pending is not None and self.issued is not None:
                (low, high), self._marks = self._marks, (self._marks[1], self.issued())
                retried, self._aging_retried, self.retried = self._aging_retried, self.retried, []
                if high > low or retried:
                    for task, state in self.still_pending(low, high, retried):
                        self.add(pending_event(task, state))
            busy = False
            if self.running is not None:
                events, busy = self.running()
                for event in events:
                    self.add(event)
            events, ended, dropped = self.take()
            if events or ended or dropped:
                try:
                    self._ship(events, ended, dropped)
                except Exception:
                    log.debug("shipping task events failed", exc_info=True)
            pending = self._marks[0] != self._marks[1] or self._aging_retried or self.retried
            if pending or self._events or self._ended or busy:
                self.arm()
        except Exception:
            self.arm()
            raise


def pending_event(task: Any, state: str) -> tuple:
    actor = task.actor
    options = task.options
    return (
        PENDING,
        task.task_id,
        task.attempt,
        task.created,
        options.name,
        task.job.job_id,
        actor.actor_id if actor is not None else None,
        task.parent,
        options.resources,
        state,
    )


def done_event(task: Any, error: Any) -> tuple:
    """The event of a task attempt that ended (error: an error payload, [type, message],
    or None when it succeeded)."""
    actor = task.actor
    options = task.options
    pushed = task.pushed + WALL_OFFSET if task.pushed else None
    return (
        FINISHED if error is None else FAILED,
        task.task_id,
        task.attempt,
        task.created,
        pushed,
        time.time(),
        options.name,
        task.job.job_id,
        actor.actor_id if actor is not None else None,
        task.parent,
        options.resources,
        task.run,
        error,
        task.reported,
    )


class TaskEventSink:
    """A raylet's side: events its processes shipped, merged per attempt and written to
    Redis every interval by the sink's own thread (bounded: past `capacity` buffered events
    new ones are counted as lost)."""

    def __init__(self, gcs: Any, node_id: str, stopping: threading.Event):
        self.gcs = gcs
        self.node_id = node_id
        self.interval = report_interval()
        self.capacity = buffer_capacity() * 4
        self.max_tasks = max_tasks()
        self.max_per_job = max_tasks_per_job()
        self._stopping = stopping
        self._lock = threading.Lock()
        self._batches: list[tuple[dict, list, list]] = []
        self._buffered = 0
        self._lost = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="task-events")

    def start(self) -> None:
        self._thread.start()

    def ingest(self, process: dict, events: list, ended: list, dropped: int) -> None:
        """(reactor thread) A process's shipment (see TaskEventRecorder.take); `process`:
        worker_id (hex) and pid."""
        size = len(events) + sum(map(len, ended))
        with self._lock:
            self._lost += dropped
            if self._buffered + size > self.capacity:
                self._lost += size
                return
            self._buffered += size
            self._batches.append((process, events, ended))

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            self.flush()
        self.flush()

    def flush(self) -> None:
        with self._lock:
            batches, self._batches = self._batches, []
            lost, self._lost = self._lost, 0
            self._buffered = 0
        if not batches and not lost:
            return
        batch = merge(batches, self.node_id)
        batch.lost = lost
        try:
            keys.write_task_events(self.gcs, batch, self.max_tasks, self.max_per_job)
        except Exception as exc:
            # Redis away (or refusing): these are lost, and counted once it is back.
            with self._lock:
                self._lost += lost + len(batch)
            log.warning("writing task events failed: %s", exc)


STATE_RANK = keys.STATE_RANK
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


def merge(batches: list[tuple[dict, list, list]], node_id: str) -> keys.TaskEventBatch:
    """The attempts described by what processes shipped (in arrival order; each shipment:
    process, event tuples, columns.Ended), ready to write: see keys.write_task_events."""
    by_attempt: dict[tuple[bytes, int], Any] = {}
    batch = keys.TaskEventBatch()
    for _, _, ended in batches:
        for group in ended:
            add_complete(batch, group)
    rest = [(process, event) for process, events, _ in batches for event in events]
    reported = [piece for piece in batch.pieces if piece.entries]
    if rest and reported:  # (what else was reported of them is out of date now)
        complete = {attempt for piece in reported for attempt in columns.attempts(piece.ids)}
        rest = [(p, e) for p, e in rest if (e[1], e[2]) not in complete]
    for process, event in rest:
        key = (event[1], event[2])
        seen = by_attempt.get(key)
        if seen is None:
            by_attempt[key] = (process, event)
        elif type(seen) is list:
            seen.append((process, event))
        else:
            by_attempt[key] = [seen, (process, event)]
    resources_json: dict[int, str] = {}
    statics: dict[tuple, tuple] = {}
    for (task_id, attempt), seen in by_attempt.items():
        if type(seen) is tuple and seen[1][0] == PENDING:
            _add_pending(batch, seen[1], statics, resources_json)
        else:
            _merge_slow(batch, task_id, attempt, seen, node_id, resources_json)
    return batch


def _add_pending(
    batch: keys.TaskEventBatch,
    event: tuple,
    statics: dict[tuple, tuple],
    resources_json: dict[int, str],
) -> None:
    """An attempt reported pending, alone in the batch (a queued task, the common case of
    reports): its record formatted straight away, as `_apply` would build it."""
    _, task_id, attempt, created, name, job_id, actor_id, parent, resources, state = event
    key = (name, job_id, actor_id, id(resources))
    static = statics.get(key)
    if static is None:
        fields = _identity(name, job_id, actor_id, resources, resources_json)
        counted = keys.counted_indexes(job_id, name, fields.get("actor_id"))
        static = statics[key] = (_ENCODE(fields)[1:-1], counted)
    text, counted = static
    task_hex = task_id.hex()
    created_ms = int(created * 1000)
    rank = STATE_RANK[state]
    parent_field = f',"parent_task_id":"{parent.hex()}"' if parent else ""
    blob = (
        f'{{{text},"creation_time_ms":{created_ms}{parent_field},"task_id":"{task_hex}",'
        f'"attempt_number":{attempt},"state":"{state}","rank":{rank}}}'
    )
    entry = keys.entry_id(task_hex, attempt)
    batch.partial.append((entry, created_ms, rank, state, blob, "m", counted, ""))


def add_complete(batch: keys.TaskEventBatch, ended: columns.Ended) -> None:
    """Add attempts that finished with their worker's reply to the batch, as pieces: each is
    complete in what its owner gathered (what was reported of it before, pending or running,
    only goes out of date)."""
    resources_json = json.dumps(ended.resources) if ended.resources else None
    actor_id = ended.actor_id.hex() if ended.actor_id else None
    counted = keys.counted_indexes(ended.job_id, ended.name, actor_id)
    for part in columns.cut(ended, keys.WRITE_CHUNK):
        ids, body, nodes = columns.encode(part, resources_json)
        entries = ""
        if part.reported:  # (stored as pending or running before)
            entries = " ".join(keys.entry_id(t.hex(), n) for t, n in columns.attempts(ids))
        indexes = {"all", *("node_id:" + node for node in nodes)}
        span = columns.span_of(part)
        batch.pieces.append(keys.Piece(counted, ids, span, body, entries, part.running, indexes))


def _merge_slow(
    batch: keys.TaskEventBatch,
    task_id: bytes,
    attempt: int,
    seen: Any,
    node_id: str,
    resources_json: dict[int, str],
) -> None:
    """An attempt whose events need merging (here, and with what Redis holds)."""
    entry = keys.entry_id(task_id.hex(), attempt)
    only = type(seen) is tuple
    if only and seen[1][0] >= FINISHED and not seen[1][13] and not (seen[1][11] and seen[1][11][1]):
        fields = _ended(seen[1], resources_json)  # ended, never reported: complete
        partial = False
    else:
        fields = {}
        rank = 0
        ended = False
        for process, event in (seen,) if only else seen:
            state = _apply(fields, event, process, node_id, resources_json)
            ended = ended or event[0] >= FINISHED
            if STATE_RANK[state] > rank:
                rank = STATE_RANK[state]
                fields["state"] = state
        partial = True
    fields["task_id"] = task_id.hex()
    fields["attempt_number"] = attempt
    state = fields["state"]
    rank = fields["rank"] = STATE_RANK[state]
    score = fields.get("creation_time_ms") or fields.get("start_time_ms") or 0
    blob = _ENCODE(fields)
    if partial:  # (its indexes: in Redis, which knows whether the attempt is new there)
        counted = keys.counted_indexes(
            fields.get("job_id"), fields.get("name"), fields.get("actor_id")
        )
        mode = "r" if ended else "m"
        node = fields.get("node_id") or ""
        batch.partial.append((entry, score, rank, state, blob, mode, counted, node))
    else:
        segment = batch.segment(
            fields.get("job_id") or "", fields.get("name") or "", fields.get("actor_id")
        )
        segment.lines.append(f"{entry}\t{blob}")
        if state != "FINISHED":  # (finished: most of `all`, found by reading it)
            batch.add_scored("state:" + state, score, entry)
        if fields.get("node_id"):
            segment.indexes.add("node_id:" + fields["node_id"])


def _identity(
    name: str, job_id: str, actor_id: bytes | None, resources: Any, resources_json: dict[int, str]
) -> dict[str, Any]:
    """The fields that say what an attempt runs (the same in each of its events)."""
    fields: dict[str, Any] = {
        "name": name,
        "job_id": job_id,
        "type": "ACTOR_TASK" if actor_id else "NORMAL_TASK",
    }
    if actor_id:
        fields["actor_id"] = actor_id.hex()
    if resources:
        text = resources_json.get(id(resources))
        if text is None:
            text = resources_json[id(resources)] = json.dumps(resources)
        fields["required_resources"] = text
    return fields


def _ended(event: tuple, resources_json: dict[int, str]) -> dict[str, Any]:
    """The fields of an attempt from its end event alone."""
    (kind, _, _, created, pushed, ended, name, job_id, actor_id, parent, resources, run, error,
     _) = event  # fmt: skip
    fields = _identity(name, job_id, actor_id, resources, resources_json)
    fields["creation_time_ms"] = int(created * 1000)
    fields["end_time_ms"] = int(ended * 1000)
    if pushed:
        fields["submitted_time_ms"] = int(pushed * 1000)
    if parent:
        fields["parent_task_id"] = parent.hex()
    if run is not None:
        if run[0]:
            fields["start_time_ms"] = int(run[0] * 1000)
        fields["node_id"] = run[2]
        fields["worker_id"] = run[3]
        fields["worker_pid"] = run[4]
    if kind == FAILED:
        fields["state"] = "FAILED"
        fields["error_type"] = error[0]
        fields["error_message"] = error[1][:MAX_ERROR_MESSAGE]
    else:
        fields["state"] = "FINISHED"
    return fields


def _apply(
    fields: dict[str, Any], event: tuple, process: dict, node_id: str, resources_json: dict
) -> str:
    """Merge one event into an attempt's fields; the state it reports."""
    kind = event[0]
    if kind >= FINISHED:
        fields.update(_ended(event, resources_json))
        return fields["state"]
    if kind == PENDING:
        _, _, _, created, name, job_id, actor_id, parent, resources, state = event
        fields.update(_identity(name, job_id, actor_id, resources, resources_json))
        fields["creation_time_ms"] = int(created * 1000)
        if parent:
            fields["parent_task_id"] = parent.hex()
        return state
    if kind == PUSHED:
        fields["submitted_time_ms"] = int(event[3] * 1000)
        return "SUBMITTED_TO_WORKER"
    _, _, _, started, name, job_id = event  # RUNNING, from the worker
    fields["start_time_ms"] = int(started * 1000)
    fields["name"] = name
    fields["job_id"] = job_id
    fields["node_id"] = node_id
    fields["worker_id"] = process.get("worker_id", "")
    fields["worker_pid"] = process.get("pid")
    return "RUNNING"
