"""The caller side of actors: one queue per actor, calls pushed straight to the actor process.

Calls from this process to one actor are sent in submission order over one connection, each
as soon as its arguments are ready and no earlier call still waits. The actor's state
(alive at an address, restarting, dead with a cause) arrives by Redis pub/sub, so a death is
learnt without polling; a dropped connection fails or retries the calls in flight.
"""

from __future__ import annotations

import collections
import logging
import pickle
import threading
from typing import TYPE_CHECKING, Any

from redray import exceptions
from redray.connection import Connection
from redray.object_ref import ObjectRef

if TYPE_CHECKING:
    from redray.actor import ActorHandle
    from redray.worker import CoreWorker

log = logging.getLogger(__name__)

DEATH_CAUSE_WAIT = 2.0  # how long failed in-flight calls wait to learn why the actor died


class _ActorState:
    """What this process knows of one actor it calls."""

    __slots__ = (
        "actor_id",
        "hex",
        "info",
        "state",
        "conn",
        "connecting",
        "queue",
        "inflight",
        "seq",
        "cause",
        "dying",
    )

    def __init__(self, actor_id: bytes):
        self.actor_id = actor_id
        self.hex = actor_id.hex()
        self.info: dict[str, Any] = {}
        self.state = "UNKNOWN"
        self.conn: Connection | None = None
        self.connecting = False
        self.queue: collections.deque = collections.deque()  # calls not yet sent, in order
        self.inflight: dict[bytes, Any] = {}  # sent, awaiting a reply (insertion = send order)
        self.seq = -1
        self.cause = ""
        self.dying: list = []  # in-flight calls lost with the process, failed once its fate is known


class ActorSubmitter:
    """Per-process registry of the actors this process calls, and their call queues."""

    def __init__(self, worker: CoreWorker):
        self.worker = worker
        self._lock = threading.RLock()
        self._actors: dict[bytes, _ActorState] = {}

    # -- creation ---------------------------------------------------------------------------
    def wire_creation_args(self, args: tuple, kwargs: dict, name: str) -> tuple:
        """Constructor arguments as sent to the actor: refs resolved to payloads now."""
        tasks = self.worker.submitter
        keep: list[ObjectRef] = []
        deps: list[ObjectRef] = []
        wire_args = tuple(tasks._wire_arg(a, keep, deps, name) for a in args)
        wire_kwargs = {k: tasks._wire_arg(v, keep, deps, name) for k, v in kwargs.items()}
        if deps:
            self.worker.wait_ready(deps, len(deps), None)
        failure = tasks.fill_ref_args(wire_args, wire_kwargs)
        if failure is not None:
            from redray.worker import unpickle_error

            raise unpickle_error(failure[1])  # an argument's task failed
        return wire_args, wire_kwargs, keep

    def create(self, actor_id: bytes, info: dict, spec: bytes, keep: list) -> ActorHandle:
        from redray.actor import ActorHandle

        worker = self.worker
        worker.new_owned(actor_id)
        worker.set_value(actor_id, ("actor", keep))
        handle = ActorHandle(actor_id, info)
        state = self._state(actor_id)
        with self._lock:
            state.info = info
            state.state = "PENDING_CREATION"
            state.seq = 0
        self._ensure_watching()
        worker.gcs.create_actor(actor_id.hex(), info, spec)
        return handle

    def out_of_scope(self, actor_id: bytes) -> None:
        """The last handle of an actor we created is gone (called off the reactor thread)."""
        self.worker.gcs.push_request(pickle.dumps(("actor_out_of_scope", actor_id.hex())))

    # -- calls ------------------------------------------------------------------------------
    def submit(self, handle: ActorHandle, method: str, args: tuple, kwargs: dict, options: Any):
        state = self._state(handle._actor_id)
        tasks = self.worker.submitter
        task, refs, deps = tasks.prepare(method, args, kwargs, options, actor=state)
        with self._lock:
            task.unresolved = len(deps) + 1  # not sendable before its arguments are resolved
            state.queue.append(task)
        if state.state == "UNKNOWN":
            self._lookup(state)
        tasks.await_dependencies(task, deps)
        return refs

    def dependencies_ready(self, task: Any) -> None:
        self._pump(task.actor)

    def _pump(self, state: _ActorState) -> None:
        """Send queued calls in order while the head of the queue is ready."""
        with self._lock:
            if state.state == "DEAD":
                # Calls in flight fail too: their connection may have closed before we knew.
                failed = list(state.inflight.values()) + list(state.queue)
                state.inflight.clear()
                state.queue.clear()
            else:
                failed = None
                conn = state.conn
                if conn is None or conn.closed:
                    if state.state == "ALIVE" and state.queue:
                        self._connect(state)
                    return
                queue = state.queue
                while queue and queue[0].unresolved == 0:
                    task = queue.popleft()
                    if task.cancelled:
                        continue
                    state.inflight[task.task_id] = task
                    self.worker.introduce(conn, task.job)
                    conn.send(
                        (
                            "actor_task",
                            task.task_id,
                            task.fn_key,
                            task.options.name,
                            task.args,
                            task.kwargs,
                            len(task.return_ids),
                            task.job.job_id,
                            task.options.concurrency_group,
                        )
                    )
        if failed:
            error = self._death_error(state)
            for task in failed:
                self.worker.submitter.fail(task, error)

    def _connect(self, state: _ActorState) -> None:
        """Open (once) the connection to an alive actor, then pump (lock held)."""
        address = state.info.get("address")
        if not address or state.connecting:
            return
        state.connecting = True
        peer = (address[0], address[1], bytes.fromhex(address[2]))

        def connected(conn: Connection | None) -> None:
            with self._lock:
                state.connecting = False
                if conn is None:
                    return  # the actor is gone; its state change will follow
                conn.info.setdefault("actors", set()).add(state.actor_id)
                state.conn = conn
            self._pump(state)

        self.worker.peer_async(peer, connected)

    def on_done(self, task: Any, results: list) -> None:
        state = task.actor
        tasks = self.worker.submitter
        with self._lock:
            state.inflight.pop(task.task_id, None)
        first = results[0] if results else None
        if first is not None and first[0] == "e" and tasks.should_retry_error(task, first):
            if task.retries_left > 0:
                task.retries_left -= 1
            with self._lock:
                state.queue.appendleft(task)
            self._pump(state)
            return
        tasks.finish(task, results)

    def cancel(self, task: Any, force: bool) -> None:
        state = task.actor
        with self._lock:
            queued = task in state.queue
            if queued:
                state.queue.remove(task)
            sent = task.task_id in state.inflight
            conn = state.conn
        if queued:
            self.worker.submitter.fail(task, exceptions.TaskCancelledError(task.task_id.hex()))
        elif sent and conn is not None:
            conn.send(("cancel", task.task_id, False, True))

    def on_connection_lost(self, conn: Connection) -> None:
        """The connection to an actor broke: retry or fail what was in flight."""
        for actor_id in conn.info.get("actors", ()):
            state = self._actors.get(actor_id)
            if state is None:
                continue
            with self._lock:
                if state.conn is not conn:
                    continue
                if state.state == "ALIVE":
                    state.state = "RESTARTING?"  # until the control loop says what happened
                state.dying.extend(self._lose_connection(state))
            # Their error should say why the actor died: wait (briefly) for its new state.
            self.worker.reactor.call_later(DEATH_CAUSE_WAIT, self._fail_dying, state)
            self._lookup(state)

    def _lose_connection(self, state: _ActorState) -> list:
        """Drop the connection to an actor (lock held): calls in flight with retries left go
        back to the front of the queue, in order; the others are returned to be failed."""
        state.conn = None
        lost = list(state.inflight.values())
        state.inflight.clear()
        retry = [t for t in lost if t.retries_left != 0 and not t.cancelled]
        for task in reversed(retry):
            if task.retries_left > 0:
                task.retries_left -= 1
            state.queue.appendleft(task)
        return [t for t in lost if t not in retry]

    def _fail_lost(self, state: _ActorState, failed: list) -> None:
        if not failed:
            return
        if state.state == "DEAD":
            error = self._death_error(state)
        else:
            error = exceptions.ActorDiedError(
                f"The actor {state.info.get('class_name', '')} ({state.hex}) died "
                "unexpectedly before finishing this task"
                + (" (it is being restarted)." if state.state == "RESTARTING" else "."),
                state.hex,
            )
        for task in failed:
            self.worker.submitter.fail(task, error)

    def _fail_dying(self, state: _ActorState) -> None:
        with self._lock:
            failed, state.dying = state.dying, []
        self._fail_lost(state, failed)

    # -- actor states -----------------------------------------------------------------------
    def _state(self, actor_id: bytes) -> _ActorState:
        state = self._actors.get(actor_id)
        if state is None:
            with self._lock:
                state = self._actors.get(actor_id)
                if state is None:
                    state = self._actors[actor_id] = _ActorState(actor_id)
        return state

    def _lookup(self, state: _ActorState) -> None:
        """Learn an actor's current state: subscribe first, then read the table."""
        self._ensure_watching()

        def read() -> None:
            try:
                info = self.worker.gcs.actor(state.hex)
            except Exception:
                if self.worker.shutting_down:
                    return
                raise
            if info is None:
                info = {"state": "DEAD", "death_cause": "The actor does not exist.", "seq": 1 << 60}
            self._apply(state, info, from_table=True)

        threading.Thread(target=read, daemon=True, name="redray-actor-lookup").start()

    def _apply(self, state: _ActorState, info: dict, from_table: bool = False) -> None:
        with self._lock:
            seq = info.get("seq", 0)
            if seq < state.seq or (
                seq == state.seq and state.state not in ("UNKNOWN", "RESTARTING?")
            ):
                return
            moved = state.info.get("address") != info.get("address")
            newer = seq > state.seq
            state.seq = seq
            state.info = info
            state.state = info["state"]
            state.cause = info.get("death_cause", "")
            failed = []
            if state.conn is not None and (state.state != "ALIVE" or moved):
                # Heard of the death before seeing the connection close: same handling.
                failed = self._lose_connection(state)
            if newer and state.state != "ALIVE":
                failed += state.dying
                state.dying = []
        self._fail_lost(state, failed)
        self._pump(state)

    def _death_error(self, state: _ActorState) -> exceptions.ActorDiedError:
        cause = state.cause or "The actor is dead."
        creation_error = state.info.get("creation_error")
        if creation_error:
            cause = (
                f"The actor died because of an error raised in its creation task, {creation_error}"
            )
        return exceptions.ActorDiedError(
            f"The actor {state.info.get('class_name', '')} ({state.hex}) is dead: {cause}",
            state.hex,
        )

    def _ensure_watching(self) -> None:
        self.worker.watcher.ensure_running()

    def on_state(self, info: dict) -> None:
        """A published actor state change (from the process's watcher thread)."""
        state = self._actors.get(bytes.fromhex(info["actor_id"]))
        if state is not None:
            self._apply(state, info)
