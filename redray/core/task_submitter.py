"""Submitting normal tasks: dependencies, leases, pushes, retries and cancellation.

The owner of a task waits for its `ObjectRef` arguments without holding a worker, then asks
its raylet for a *lease* on a worker for the task's scheduling shape (resources, runtime env,
strategy). It pushes tasks straight to leased workers over one connection and keeps a lease
while tasks of that shape are queued, returning it shortly after it goes idle (or at once
when the raylet asks for it back). Redis is never involved.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redray import exceptions
from redray.core import serialization
from redray.core.generators import STREAMING, ItemStream, ObjectRefGenerator
from redray.core.ids import IdSource, counter_of, return_id, task_of
from redray.core.jobs import Jobs
from redray.core.object_io import ObjectIO
from redray.core.object_ref import Address, ObjectRef
from redray.core.ownership import Ownership
from redray.core.peers import CONNECTION_LOST, Peers
from redray.core.reference_table import Released
from redray.core.serialization import error_payload, unpickle_error
from redray.resources import bundle_resources
from redray.runtime_env import spec as env_spec
from redray.state import events as task_events
from redray.state.events import TaskEventRecorder
from redray.transport import protocol
from redray.transport.connection import Connection

log = logging.getLogger(__name__)

# Tasks pushed ahead to a worker whose recent tasks were quick (< FAST_TASK_SECONDS): it
# finds the next one waiting instead of idling a round trip. Slow tasks get one at a time, so
# a long task never holds short ones hostage.
PIPELINE_DEPTH = int(os.environ.get("REDRAY_PIPELINE_DEPTH", "4"))
FAST_TASK_SECONDS = 0.005
STEAL_AFTER_SECONDS = 0.02  # a task still at the head of its line this long is slow
LEASE_IDLE_SECONDS = float(os.environ.get("REDRAY_LEASE_IDLE_SECONDS", "0.05"))
MAX_LEASE_REQUESTS = 16


@dataclass
class TaskOptions:
    """What the owner needs to schedule, retry and describe a normal task."""

    name: str
    num_returns: int = 1
    resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    max_retries: int = 3
    retry_exceptions: bool | tuple = False
    runtime_env: dict | None = None
    strategy: Any = None  # None/"DEFAULT", "SPREAD", or a strategy object's wire form
    concurrency_group: str | None = None  # actor calls: the group to run in
    # Generator functions: "streaming", "dynamic" or "fixed" (an integer num_returns; see
    # generators.py), and the items a streaming generator may yield ahead of its reader.
    generator: str | None = None
    backpressure: int = -1
    _shape_key: tuple | None = field(default=None, init=False, repr=False, compare=False)
    # job id -> these options in the job's runtime env (merged and resolved once)
    _in_env: dict | None = field(default=None, init=False, repr=False, compare=False)

    def shape_key(self) -> tuple:
        """Tasks with equal keys can share leases (options are made once per function and
        `.options()` call, so the key is computed once too)."""
        if self._shape_key is None:
            env = self.runtime_env or {}
            self._shape_key = (
                tuple(sorted(self.resources.items())),
                tuple(sorted((env.get("env_vars") or {}).items())),
                env_spec.digest(env_spec.setup_part(env)) if env_spec.needs_setup(env) else None,
                repr(self.strategy),
            )
        return self._shape_key


class _Task:
    __slots__ = (
        "task_id",
        "fn_key",
        "options",
        "args",
        "kwargs",
        "keep",
        "return_ids",
        "retries_left",
        "unresolved",
        "cancelled",
        "force",
        "lease",
        "shape",
        "parent",
        "actor",
        "job",
        "pushed",
        "stream",
        "attempt",
        "created",
        "reported",
        "run",
    )

    def __init__(self, task_id, fn_key, options, args, kwargs, keep, return_ids, parent):
        self.task_id = task_id
        self.fn_key = fn_key
        self.options: TaskOptions = options
        self.args = args
        self.kwargs = kwargs
        self.keep = keep  # ObjectRefs the arguments need alive until the task is done
        self.return_ids = return_ids
        self.retries_left = options.max_retries
        self.unresolved = 0
        self.cancelled = False
        self.force = False
        self.lease: _Lease | None = None
        self.shape: _Shape | None = None
        self.parent = parent
        self.actor: Any = None  # the caller-side actor state for actor tasks
        self.job: Any = None  # the JobInfo the task belongs to
        self.pushed = 0.0  # when it was sent to its worker
        self.stream: ItemStream | None = None  # a generator task's items
        self.attempt = 0  # Ray's attempt_number: 0, then one more per retry
        self.created = time.time()  # when this attempt was submitted
        self.reported = False  # its owner reported this attempt as pending (task events)
        self.run: tuple | None = None  # how its worker ran it (from the reply)


class _Lease:
    __slots__ = (
        "lease_id",
        "conn",
        "raylet",
        "inflight",
        "grant",
        "idle_since",
        "timer",
        "returned",
        "wanted_back",
        "single_use",
        "fast",
        "shape",
        "retired",
    )

    def __init__(self, lease_id, conn, raylet, grant, shape):
        self.lease_id = lease_id
        self.shape: _Shape = shape
        self.conn: Connection = conn
        self.raylet: Connection = raylet
        self.inflight: dict[bytes, _Task] = {}
        self.grant = grant  # what the worker needs to know about its lease (GPU ids, ...)
        self.idle_since: float | None = None  # when it last went idle (None: busy)
        self.timer = False  # an idle check is scheduled
        self.returned = False
        self.wanted_back = False  # the raylet has work waiting: return as soon as idle
        self.single_use = False  # SPREAD: each task is placed on its own, so no reuse
        self.fast = False  # its last task was quick: more may be pushed ahead
        self.retired = False  # its worker reached a max_calls: returned to be ended


class _Shape:
    __slots__ = ("key", "options", "queue", "leases", "requesting", "warned")

    def __init__(self, key, options):
        self.key = key
        self.options: TaskOptions = options
        self.queue: collections.deque[_Task] = collections.deque()
        self.leases: list[_Lease] = []
        self.requesting = 0
        self.warned = False


class TaskSubmitter:
    """Owner-side bookkeeping of the normal tasks this process submitted."""

    def __init__(
        self,
        peers: Peers,
        ownership: Ownership,
        objects: ObjectIO,
        jobs: Jobs,
        ids: IdSource,
        background: Callable[..., None],
    ):
        self._peers = peers
        self._ownership = ownership
        self._objects = objects
        self._jobs = jobs
        self._ids = ids
        self._background = background
        self._reactor = peers.reactor
        self.raylet: Connection | None = None  # this node's raylet (see `attach`)
        self._lock = threading.RLock()
        self._tasks: dict[bytes, _Task] = {}
        # Every table holds only what is alive: shapes with queued work, leases or requests;
        # leases held; parents with unfinished children; raylets with an open connection.
        self._shapes: dict[tuple, _Shape] = {}
        self._leases: dict[tuple[Connection, int], _Lease] = {}  # by (raylet, lease id)
        self._children: dict[bytes, list[bytes]] = {}
        # Grants whose worker is being connected to: True once the raylet wants them back.
        self._connecting: dict[tuple[Connection, int], bool] = {}
        self._lineage: dict[bytes, _Task] = {}  # tasks whose stored returns may need rebuilding
        # Where task state changes are recorded for the state API (None: not recorded).
        self.events: TaskEventRecorder | None = None
        peers.handle("done", self._on_done)
        peers.handle("stolen", self._on_stolen)
        peers.handle("lease_reclaim", self._on_reclaim)
        peers.handle("retire", self._on_retire)
        peers.handle("cancel_request", self._on_cancel_request)
        peers.handle("reconstruct", self._on_reconstruct)
        peers.handle("gen_item", self._on_item)
        peers.on_closed(self.on_connection_lost)
        ownership.on_owned_freed(self._forget_lineage)
        objects.reconstruct = self.reconstruct

    def attach(self, raylet: Connection) -> None:
        """This node's raylet, where leases are asked for first."""
        self.raylet = raylet

    # -- submission -------------------------------------------------------------------------
    def submit(self, fn_key: str, args: tuple, kwargs: dict, options: TaskOptions) -> list:
        """Submit a normal task; returns its return refs."""
        task, refs, deps = self.prepare(fn_key, args, kwargs, options)
        self.await_dependencies(task, deps)
        return refs

    def prepare(
        self, fn_key: str, args: tuple, kwargs: dict, options: TaskOptions, actor: Any = None
    ) -> tuple[_Task, list[ObjectRef], list[ObjectRef]]:
        """A task with its arguments wired and return refs made; (task, refs, dependencies)."""
        self._ownership.process_released()
        task_id = self._ids.task_id()
        keep: list[ObjectRef] = []
        deps: list[ObjectRef] = []
        wire_args = tuple(self._wire_arg(a, keep, deps, options.name) for a in args)
        wire_kwargs = {k: self._wire_arg(v, keep, deps, options.name) for k, v in kwargs.items()}
        return_ids = [return_id(task_id, i) for i in range(options.num_returns)]
        for rid in return_ids:
            self._ownership.new_owned(rid)
        address = self._peers.address
        refs = [ObjectRef(rid, address) for rid in return_ids]
        running = self._jobs.current_task()
        parent = running.task_id if running is not None else None
        if parent is not None and options.strategy is None and actor is None:
            options = self._captured(options, running)
        job = self._jobs.current()
        if actor is None and (options.runtime_env is not None or job.runtime_env):
            options = self._in_job_env(options, job)
        task = _Task(task_id, fn_key, options, wire_args, wire_kwargs, keep, return_ids, parent)
        task.actor = actor
        task.job = job
        if options.generator is not None:
            task.stream = ItemStream(
                task,
                options.generator,
                options.num_returns,
                options.backpressure,
                self._objects,
                self._ownership,
                address,
            )
            if options.generator == STREAMING:
                refs = [ObjectRefGenerator(refs[0], task.stream)]
        with self._lock:
            self._tasks[task_id] = task
            if parent is not None:
                self._children.setdefault(parent, []).append(task_id)
        events = self.events
        if events is not None:  # (it checks for tasks still pending: see still_pending)
            events.arm()
        return task, refs, deps

    def _in_job_env(self, options: TaskOptions, job: Any) -> TaskOptions:
        """The options with the runtime env the task runs in: its own merged over the one it
        inherits, packages uploaded (once per options and job)."""
        cache = options._in_env
        if cache is None:
            cache = options._in_env = {}
        in_env = cache.get(job.job_id)
        if in_env is None:
            env = self._jobs.runtime_env_for(options.runtime_env, job)
            in_env = dataclasses.replace(options, runtime_env=env)
            in_env._in_env = {job.job_id: in_env}
            cache[job.job_id] = in_env
        return in_env

    def still_pending(self, low: int, high: int, retried: list[_Task]) -> list[tuple[_Task, str]]:
        """(reactor thread, task events) Those of the tasks numbered low+1..high and of the
        retried ones not finished, with the state to report each in (they have been pending
        for an interval). Each is marked reported first, so its end is recorded as
        following this report (see `finish`)."""
        in_flight = self._tasks
        if high - low > len(in_flight):
            with self._lock:  # (a copy: submitting threads wait only for that)
                candidates = list(in_flight.values())
            tasks = [t for t in candidates if low < counter_of(t.task_id) <= high]
        else:
            numbered = map(self._ids.task_id_at, range(low + 1, high + 1))
            tasks = [t for t in map(in_flight.get, numbered) if t is not None]
        tasks += [t for t in retried if t.task_id in in_flight]
        found = []
        for task in tasks:
            task.reported = True
            if task.task_id not in in_flight:  # (it finished meanwhile)
                continue
            actor = task.actor
            if task.lease is not None or (actor is not None and task.task_id in actor.inflight):
                found.append((task, "SUBMITTED_TO_WORKER"))
            elif task.unresolved:
                found.append((task, "PENDING_ARGS_AVAIL"))
            else:
                found.append((task, "PENDING_NODE_ASSIGNMENT"))
        return found

    def record_retry(self, task: _Task, failure: Any) -> None:
        """A task or call is tried again: its attempt failed with `failure` (an error payload
        or exception), and a new attempt starts."""
        events = self.events
        if events is not None:
            if isinstance(failure, BaseException):
                failure = [task_events.error_type_of(failure), str(failure)]
            events.ended(task, failure)
        task.attempt += 1
        task.created = time.time()
        task.reported = False
        task.run = None
        task.pushed = 0.0
        if events is not None:
            events.retried.append(task)
            events.arm()

    def _captured(self, options: TaskOptions, running: Any) -> TaskOptions:
        """Children of a task in a placement group that captures them run in it too."""
        grant = running.grant or {}
        if not grant.get("capture"):
            return options
        pg_id = grant["pg_id"]
        strategy = {"type": "placement_group", "pg_id": pg_id, "bundle_index": -1, "capture": True}
        return dataclasses.replace(
            options, resources=bundle_resources(options.resources, pg_id, -1), strategy=strategy
        )

    def await_dependencies(self, task: _Task, deps: list[ObjectRef]) -> None:
        """Resolve ObjectRef arguments without holding a worker, then schedule the task."""
        with self._lock:
            task.unresolved = len(deps) + 1  # +1: released below, once every callback is set
        for dep in deps:
            self._objects.on_ready(dep, lambda t=task: self._dependency_ready(t))
        self._dependency_ready(task)

    def _wire_arg(self, value: Any, keep: list, deps: list, name: str) -> Any:
        """An argument as sent: pickled bytes, or a ref marker resolved before the push."""
        if type(value) is ObjectRef:
            keep.append(value)
            deps.append(value)
            return [value._id, None]
        try:
            data, refs = serialization.dumps(value)
        except Exception as exc:
            raise serialization.describe_failure(
                value, exc, f"the argument for task or actor {name}:"
            ) from exc
        if len(data) > serialization.INLINE_LIMIT:
            ref = self._objects.put(value)
            keep.append(ref)
            deps.append(ref)
            return [ref._id, None]
        keep.extend(refs)
        return data

    def _dependency_ready(self, task: _Task) -> None:
        with self._lock:
            task.unresolved -= 1
            if task.unresolved or task.task_id not in self._tasks:
                return  # still waiting, or already finished (cancelled, actor dead, ...)
        failure = self._resolve_args(task)
        if failure is not None:
            self.finish(task, [failure] * len(task.return_ids))
            return
        if task.cancelled:
            self._finish_cancelled(task)
            return
        self._enqueue(task)

    def _resolve_args(self, task: _Task) -> tuple | None:
        return self.fill_ref_args(task.args, task.kwargs)

    def fill_ref_args(self, args: tuple, kwargs: dict) -> tuple | None:
        """Fill each ref argument with its payload; return an error payload to propagate."""
        for items in (args, kwargs.values()):
            for item in items:
                if type(item) is list:
                    payload = self._objects.payload_of(item[0])
                    if payload[0] == "e":
                        return payload
                    item[1] = payload
        return None

    def _enqueue(self, task: _Task) -> None:
        options = task.options
        key = options.shape_key()
        with self._lock:
            shape = self._shapes.get(key)
            if shape is None:
                shape = self._shapes[key] = _Shape(key, options)
            task.shape = shape
            shape.queue.append(task)
            self._dispatch(shape)

    def _dispatch(self, shape: _Shape) -> None:
        """Push queued tasks to leases with room; ask for more leases if still queued (lock held)."""
        queue = shape.queue
        if shape.options.strategy == "SPREAD":
            # Each task gets a lease requested for it alone, so placement follows the
            # raylet's round-robin over nodes instead of whichever lease comes back first.
            while queue and shape.requesting < MAX_LEASE_REQUESTS:
                shape.requesting += 1
                self._request_lease(shape, self.raylet, bound=queue.popleft())
        batches: dict[_Lease, list[bytes]] = {}
        while queue:
            best = None
            for lease in shape.leases:
                if lease.single_use and (lease.inflight or lease.wanted_back):
                    continue
                depth = PIPELINE_DEPTH if lease.fast else 1
                if len(lease.inflight) < depth and (
                    best is None or len(lease.inflight) < len(best.inflight)
                ):
                    best = lease
                    if not lease.inflight:
                        break
            if best is None:
                break
            task = queue.popleft()
            batches.setdefault(best, []).append(self._push(best, task))
        for lease, frames in batches.items():
            # One send per worker per pass: several frames in one syscall.
            lease.conn.send_bytes(frames[0] if len(frames) == 1 else b"".join(frames))
            if len(lease.inflight) > 1:
                head = next(iter(lease.inflight))
                self._reactor.call_later(STEAL_AFTER_SECONDS, self._steal, lease, head)
        wanted = min(len(queue), MAX_LEASE_REQUESTS)
        while shape.requesting < wanted:
            shape.requesting += 1
            self._request_lease(shape, self.raylet)
        for lease in list(shape.leases):
            if lease.inflight:
                continue
            if lease.single_use and lease.wanted_back:
                self._return_if_idle(lease, force=True)
            elif not queue:
                if lease.wanted_back:
                    self._return_if_idle(lease)
                else:
                    self._schedule_return(lease)
        if not (queue or shape.leases or shape.requesting):
            self._forget_if_idle(shape)

    def _steal(self, lease: _Lease, head: bytes) -> None:
        """The task at the head of a worker's line is slow: take back those queued behind it
        (the worker gives back those it has not started), so they run elsewhere."""
        with self._lock:
            if lease.returned or len(lease.inflight) < 2 or next(iter(lease.inflight)) != head:
                return
            lease.fast = False
            behind = list(lease.inflight)[1:]
        lease.conn.send(("steal", behind))

    def _on_stolen(self, conn: Connection, message: tuple) -> None:
        """Tasks a worker gave back unstarted: first in line again, in their order."""
        with self._lock:
            returned = []
            for task_id in message[1]:
                task = self._tasks.get(task_id)
                lease = task.lease if task is not None else None
                if lease is not None and lease.inflight.pop(task_id, None) is not None:
                    task.lease = None
                    returned.append(task)
            for task in reversed(returned):
                self._requeue(task)
            for shape in {task.shape for task in returned}:
                self._dispatch(shape)

    def _push(self, lease: _Lease, task: _Task) -> bytes:
        """Bind task to lease; returns its frame, for the caller to send."""
        if lease.single_use:
            lease.wanted_back = True  # give it back after this one task
        task.lease = lease
        task.pushed = time.monotonic()
        lease.inflight[task.task_id] = task
        lease.idle_since = None
        stream = task.stream
        message = (
            "task",
            task.task_id,
            task.fn_key,
            task.options.name,
            task.args,
            task.kwargs,
            len(task.return_ids) if stream is None else stream.wire(),
            lease.grant,
            task.job.job_id,
            task.attempt,
        )
        self._jobs.introduce(lease.conn, task.job)
        return protocol.encode(message)

    # -- leases -----------------------------------------------------------------------------
    def _request_lease(
        self,
        shape: _Shape,
        raylet: Connection,
        spilled: bool = False,
        bound: _Task | None = None,
    ) -> None:
        """Ask a raylet for a lease; `bound`: the one task this lease is for (SPREAD)."""
        options = shape.options
        request = {
            "resources": options.resources,
            "env_vars": (options.runtime_env or {}).get("env_vars") or {},
            "runtime_env": options.runtime_env,
            "strategy": options.strategy,
            "name": options.name,
            "spilled": spilled,
        }
        self._peers.call_async(
            raylet,
            "lease",
            (request,),
            lambda reply: self._on_lease_reply(shape, raylet, reply, bound),
        )

    def _retry_soon(self, shape: _Shape, bound: _Task | None) -> None:
        """The node we were sent to is unreachable (dying?): ask again shortly."""

        def retry() -> None:
            with self._lock:
                shape.requesting -= 1
                if bound is not None:
                    shape.queue.appendleft(bound)
                self._dispatch(shape)

        self._reactor.call_later(0.2, retry)

    def _on_lease_reply(
        self, shape: _Shape, raylet: Connection, reply: Any, bound: _Task | None = None
    ) -> None:
        if reply is CONNECTION_LOST and raylet is not self.raylet:
            self._retry_soon(shape, bound)
            return
        if reply is CONNECTION_LOST:
            # The local raylet is gone (or this process shuts down): nothing queued can run.
            shutting_down = self._peers.shutting_down
            with self._lock:
                if not shutting_down:
                    # (Once shut down the reply comes before `call_async` returns: the count
                    # stays up, or the dispatch pass asking would ask again, forever.)
                    shape.requesting -= 1
                failed = list(shape.queue) + ([bound] if bound is not None else [])
                shape.queue.clear()
            if shutting_down:
                error: BaseException = exceptions.RaySystemError(
                    "redray.shutdown() was called before this task was scheduled"
                )
            else:
                error = exceptions.LocalRayletDiedError("the raylet of this node died")
            for task in failed:
                self.fail(task, error)
            return
        kind = reply[0]
        if kind == "granted":
            _, lease_id, address, grant = reply
            with self._lock:
                self._connecting[(raylet, lease_id)] = False

            def connected(conn: Connection | None) -> None:
                with self._lock:
                    shape.requesting -= 1
                    reclaimed = self._connecting.pop((raylet, lease_id), False)
                    if conn is None:
                        raylet.send(("lease_return", lease_id, True))
                        if bound is not None:
                            shape.queue.appendleft(bound)
                        self._dispatch(shape)
                        return
                    lease = _Lease(lease_id, conn, raylet, grant, shape)
                    lease.single_use = shape.options.strategy == "SPREAD"
                    # Granted after the work it was asked for went elsewhere: give it back
                    # now rather than holding resources through the idle grace period.
                    lease.wanted_back = (bound is None and not shape.queue) or reclaimed
                    self._leases[(raylet, lease_id)] = lease
                    conn.info.setdefault("leases", []).append(lease)
                    shape.leases.append(lease)
                    if bound is not None and bound.task_id in self._tasks and not bound.cancelled:
                        conn.send_bytes(self._push(lease, bound))
                    self._dispatch(shape)

            self._peers.peer_async(tuple(address), connected)
        elif kind == "spillback":
            _, node_id, raylet_address = reply

            def forward(conn: Connection | None) -> None:
                if conn is None:
                    self._retry_soon(shape, bound)
                    return
                self._request_lease(shape, conn, spilled=True, bound=bound)

            self._peers.connect_raylet(node_id, raylet_address, forward)
        elif kind == "error":
            with self._lock:
                shape.requesting -= 1
                failed = list(shape.queue) + ([bound] if bound is not None else [])
                shape.queue.clear()
            for task in failed:
                self.fail(task, reply[1])

    def _schedule_return(self, lease: _Lease) -> None:
        """Give an idle lease back after LEASE_IDLE_SECONDS unless work comes meanwhile
        (one pending check per lease, however often it goes idle)."""
        lease.idle_since = time.monotonic()
        if not lease.timer:
            lease.timer = True
            self._reactor.call_later(LEASE_IDLE_SECONDS, self._idle_check, lease)

    def _idle_check(self, lease: _Lease) -> None:
        lease.timer = False
        since = lease.idle_since
        if lease.returned or lease.inflight or since is None:
            return  # busy again: the next idle moment schedules a new check
        left = since + LEASE_IDLE_SECONDS - time.monotonic()
        if left > 0:
            lease.timer = True
            self._reactor.call_later(left, self._idle_check, lease)
            return
        self._return_if_idle(lease)

    def _return_if_idle(self, lease: _Lease, force: bool = False) -> None:
        with self._lock:
            if lease.returned or lease.inflight:
                return
            if lease.shape.queue and not force:
                return
            self._drop_lease(lease)
            lease.raylet.send(("lease_return", lease.lease_id, lease.retired))

    def _drop_lease(self, lease: _Lease) -> None:
        """Forget a lease (lock held), and its shape once nothing of it is left."""
        lease.returned = True
        self._leases.pop((lease.raylet, lease.lease_id), None)
        shape = lease.shape
        if lease in shape.leases:
            shape.leases.remove(lease)
        leases = lease.conn.info.get("leases")
        if leases and lease in leases:
            leases.remove(lease)
        self._forget_if_idle(shape)

    def _forget_if_idle(self, shape: _Shape) -> None:
        """(lock held) Drop a shape with no queued work, lease or request left."""
        if not (shape.queue or shape.leases or shape.requesting):
            if self._shapes.get(shape.key) is shape:
                del self._shapes[shape.key]

    def _requeue(self, task: _Task) -> None:
        """(lock held) Put a task back at the head of its shape's queue."""
        shape = self._shapes.setdefault(task.shape.key, task.shape)
        task.shape = shape
        shape.queue.appendleft(task)

    def _on_reclaim(self, conn: Connection, message: tuple) -> None:
        """The raylet has requests waiting: give the lease back as soon as it is idle."""
        key = (conn, message[1])
        with self._lock:
            lease = self._leases.get(key)
            if lease is not None:
                lease.wanted_back = True
                self._return_if_idle(lease)
                return
            if key in self._connecting:  # granted, not connected to yet: give it back then
                self._connecting[key] = True

    def _on_retire(self, conn: Connection, message: tuple) -> None:
        """The worker ran a function's max_calls tasks: push it nothing more and give its
        lease back once what it holds has come back (the raylet replaces the process)."""
        with self._lock:
            for lease in conn.info.get("leases", ()):
                if lease.lease_id == message[1]:
                    lease.single_use = lease.wanted_back = lease.retired = True
                    self._return_if_idle(lease, force=True)
                    return

    # -- results ----------------------------------------------------------------------------
    def _on_done(self, conn: Connection, message: tuple) -> None:
        task_id, results, borrowed = message[1], message[2], message[3]
        with self._lock:
            task = self._tasks.get(task_id)
            if task is not None and len(message) > 4:
                task.run = message[4]
            lease = task.lease if task is not None else None
            if lease is not None:
                lease.inflight.pop(task_id, None)
                lease.fast = time.monotonic() - task.pushed < FAST_TASK_SECONDS
                task.lease = None
        if task is None:
            return
        if borrowed:
            self._adopt_borrows(borrowed, conn.info.get("peer_id"))
        if task.actor is not None:
            task.actor.registry.on_done(task, results)
            return
        first = results[0] if results else None
        if first is not None and first[0] == "e" and self.should_retry_error(task, first):
            task.retries_left -= 1 if task.retries_left > 0 else 0
            self.record_retry(task, first)
            with self._lock:
                self._requeue(task)
                self._dispatch(task.shape)
            return
        self.finish(task, results)
        if lease is not None:
            with self._lock:
                self._dispatch(task.shape)

    def _on_item(self, conn: Connection, message: tuple) -> None:
        """A generator task yielded an item (before its final reply, on the same connection)."""
        _, task_id, index, payload = message
        task = self._tasks.get(task_id)
        if task is not None and task.stream is not None:
            task.stream.on_item(index, payload)

    def _adopt_borrows(self, borrowed: list, borrower: bytes | None) -> None:
        """The worker kept refs it got as arguments: it now borrows them from their owners."""
        if borrower is not None:
            self._ownership.lend(borrowed, borrower)

    def should_retry_error(self, task: _Task, payload: tuple) -> bool:
        retry = task.options.retry_exceptions
        if not retry or task.retries_left == 0 or task.cancelled:
            return False
        error = unpickle_error(payload[1])
        if isinstance(error, exceptions.TaskCancelledError):
            return False
        if retry is True:
            return isinstance(error, exceptions.RayTaskError)
        cause = getattr(error, "cause", None)
        return isinstance(cause, retry)

    def finish(self, task: _Task, results: list) -> None:
        """Record a task's results as its return objects' values (once)."""
        ownership, objects = self._ownership, self._objects
        if task.stream is not None:
            results = task.stream.finish(results)
        with self._lock:
            self._tasks.pop(task.task_id, None)
            if task.parent is not None:
                siblings = self._children.get(task.parent)
                if siblings is not None:
                    try:
                        siblings.remove(task.task_id)
                    except ValueError:
                        pass
                    if not siblings:
                        del self._children[task.parent]
        events = self.events
        if events is not None:  # (after the pop: see still_pending)
            first = results[0] if results else None
            events.ended(task, first if first is not None and first[0] == "e" else None)
        for rid, payload in zip(task.return_ids, results, strict=False):
            if payload[0] in ("v", "s") and payload[-1]:
                nested = ownership.pin_nested(payload[-1], registered=True)
                if not objects.set_value(rid, payload, nested):
                    ownership.unpin(nested)
            else:
                objects.set_value(rid, payload)
        if task.actor is None and any(p[0] == "s" for p in results):
            # Values in a node's store can be lost with the node: keep what is needed to
            # make them again (the task and its arguments) while they are referenced.
            with self._lock:
                self._lineage[task.task_id] = task
        else:
            task.keep = None
            task.args = task.kwargs = None

    def fail(self, task: _Task, error: BaseException) -> None:
        self.finish(task, [error_payload(error)] * len(task.return_ids))

    def _finish_cancelled(self, task: _Task) -> None:
        self.fail(task, exceptions.TaskCancelledError(task.task_id.hex()))

    def on_connection_lost(self, conn: Connection) -> None:
        """A leased worker died: retry what it was running, or fail it."""
        leases = conn.info.get("leases")
        if not leases:
            return
        leases_lost = list(leases)
        crashed: list[_Task] = []
        with self._lock:
            for lease in list(leases):
                self._drop_lease(lease)
                # If the worker still lives (only the connection broke), it is unusable to us.
                lease.raylet.send(("lease_return", lease.lease_id, True))
                crashed.extend(lease.inflight.values())
                lease.inflight.clear()
        for task in crashed:
            task.lease = None
            if task.cancelled:
                error = (
                    exceptions.WorkerCrashedError(
                        "The worker was killed by cancel(force=True) while running this task."
                    )
                    if task.force
                    else exceptions.TaskCancelledError(task.task_id.hex())
                )
                self.fail(task, error)
            elif task.retries_left != 0:
                if task.retries_left > 0:
                    task.retries_left -= 1
                self.record_retry(task, exceptions.WorkerCrashedError())
                with self._lock:
                    self._requeue(task)
            else:
                self.fail(task, exceptions.WorkerCrashedError())
        with self._lock:
            for shape in {lease.shape for lease in leases_lost}:
                self._dispatch(shape)

    # -- cancellation -----------------------------------------------------------------------
    def cancel(
        self, task_id: bytes, force: bool, recursive: bool, owner: Address | None = None
    ) -> None:
        """Cancel a task; one another process submitted (owner: its address) is cancelled
        by that owner, which is asked over our connection to it."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None or task.cancelled:
                if task is None and owner is not None and owner[2] != self._peers.address[2]:
                    self._ask_owner_to_cancel(owner, task_id, force, recursive)
                return
            if task.actor is not None and force:
                raise ValueError("force=True is not supported for actor tasks.")
            task.cancelled = True
            task.force = force
            if task.actor is not None:
                task.actor.registry.cancel(task, force)
                return
            queued = task.shape is not None and task in task.shape.queue
            if queued:
                task.shape.queue.remove(task)
            lease = task.lease
        if lease is not None:
            lease.conn.send(("cancel", task_id, force, recursive))
        else:
            self._finish_cancelled(task)  # queued, or still waiting for its arguments

    def _ask_owner_to_cancel(
        self, owner: Address, task_id: bytes, force: bool, recursive: bool
    ) -> None:
        def send(conn: Connection | None) -> None:
            if conn is not None:  # (an owner that is gone took its tasks with it)
                conn.send(("cancel_request", task_id, force, recursive))

        self._peers.peer_async(owner, send)

    def _on_cancel_request(self, conn: Connection, message: tuple) -> None:
        """Another process cancels a task of ours whose ref it holds."""
        _, task_id, force, recursive = message
        try:
            self.cancel(task_id, force, recursive)
        except ValueError:
            log.warning("cancel(force=True) of an actor task was ignored: not supported")

    def cancel_children(self, parent: bytes, force: bool) -> None:
        with self._lock:
            children = list(self._children.get(parent, ()))
        for child in children:
            self.cancel(child, force, True)

    # -- misc -------------------------------------------------------------------------------
    def _forget_lineage(self, owned: Released) -> None:
        """Owned objects were freed: drop a task's lineage once all its returns are."""
        if not self._lineage:
            return
        objects = self._objects.refs.objects
        for oid, _ in owned:
            task = self._lineage.get(task_of(oid))
            if task is None or any(rid in objects for rid in task.return_ids):
                continue
            with self._lock:
                self._lineage.pop(task.task_id, None)
            task.keep = None
            task.args = task.kwargs = None

    def reconstruct(self, object_id: bytes) -> bool:
        """Re-run the task that made a lost object; False when it cannot be made again."""
        with self._lock:
            task = self._lineage.get(task_of(object_id))
            if task is None or task.options.max_retries == 0:
                return False  # a put, or a task that must not run twice (max_retries=0)
            if task.task_id in self._tasks:
                return True  # already being made again
            self._tasks[task.task_id] = task
            task.retries_left = task.options.max_retries
            task.cancelled = False
        self.record_retry(task, exceptions.ObjectLostError(object_id.hex()))
        log.warning("re-running %s to rebuild a lost object", task.options.name)
        self._objects.forget_values(task.return_ids)
        if self._resolve_args(task) is not None:
            return False
        self._enqueue(task)
        return True

    def _on_reconstruct(self, conn: Connection, message: tuple) -> None:
        """A borrower found an object of ours lost: make it again, answer with its payload."""
        _, call_id, oid = message
        objects = self._objects

        def answer() -> None:
            conn.send(("reply", call_id, objects.payload_of(oid)))

        def start() -> None:
            if not self.reconstruct(oid):
                error = exceptions.ObjectLostError(oid.hex(), self._peers.address)
                conn.send(("reply", call_id, error_payload(error)))
                return
            objects.on_payload(oid, answer)

        self._background(start)

    def shutdown(self) -> None:
        with self._lock:
            for shape in list(self._shapes.values()):
                for lease in list(shape.leases):
                    self._drop_lease(lease)
                    lease.raylet.send(("lease_return", lease.lease_id, False))
