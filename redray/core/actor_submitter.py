"""The caller side of actors: one queue per actor, calls pushed straight to the actor process.

Calls from this process to one actor are sent in submission order over one connection, each
as soon as its arguments are ready and no earlier call still waits. The actor's state
(alive at an address, restarting, dead with a cause) arrives by Redis pub/sub, so a death is
learnt without polling; a dropped connection fails or retries the calls in flight. Messages
published while the subscription was down are lost: once it is back, `resync` re-reads the
state of every actor followed here from the actor table, so a missed ALIVE does not leave
calls queued forever and a missed DEAD fails them.

While calls made here are unfinished (waiting for the actor to be alive, for their arguments,
or for their reply) they hold a reference to the actor, as a handle does: dropping the last
handle right after a call (`A.remote().f.remote()`) does not end the actor before the call
ran. The table of actors holds those not known to be dead; a dead actor's entry goes at once
(handles and pending calls keep their own reference to it), so it is bounded by live actors.

Threads: user threads submit; the reactor thread handles replies and connection losses; the
watcher thread applies published states. `ActorSubmitter._lock` guards every `_ActorState`
and the table (it may be held while taking the worker's lock, never the other way round).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

from redray import exceptions
from redray.core.jobs import Jobs
from redray.core.object_io import ObjectIO
from redray.core.object_ref import ObjectRef
from redray.core.ownership import Ownership
from redray.core.peers import Peers
from redray.core.reference_table import Released
from redray.core.serialization import unpickle_error
from redray.core.task_submitter import TaskSubmitter
from redray.gcs import Gcs
from redray.transport.connection import Connection
from redray.watcher import is_connection_error

log = logging.getLogger(__name__)

LOOKUP_RETRY_SECONDS = 1.0  # between reads of an actor's state while Redis fails
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
        "looking_up",
        "queue",
        "inflight",
        "seq",
        "cause",
        "dying",
        "pending",
        "pinned",
        "registry",
        "creating",
    )

    def __init__(self, actor_id: bytes, registry: ActorSubmitter):
        self.actor_id = actor_id
        self.hex = actor_id.hex()
        self.info: dict[str, Any] = {}
        self.state = "UNKNOWN"
        self.conn: Connection | None = None
        self.connecting = False
        self.looking_up = False  # its state is being read from the table
        self.queue: collections.deque = collections.deque()  # calls not yet sent, in order
        self.inflight: dict[bytes, Any] = {}  # sent, awaiting a reply (insertion = send order)
        self.seq = -1
        self.cause = ""
        self.dying: list = []  # in-flight calls lost with the process, failed once its fate is known
        self.pending: set[bytes] = set()  # ids of the calls made here and not finished yet
        self.pinned = False  # the pending calls hold a reference to the actor (see module doc)
        self.registry = registry  # the submitter this state belongs to
        self.creating = False  # its creation is being written to the GCS by this process


class ActorSubmitter:
    """Per-process registry of the actors this process calls, and their call queues."""

    def __init__(
        self,
        tasks: TaskSubmitter,
        peers: Peers,
        ownership: Ownership,
        objects: ObjectIO,
        jobs: Jobs,
        gcs: Gcs,
        background: Callable[..., None],
    ):
        self._tasks = tasks
        self._peers = peers
        self._ownership = ownership
        self._objects = objects
        self._jobs = jobs
        self._gcs = gcs
        self._background = background
        self._reactor = peers.reactor
        self.follow_states: Callable[[], None] = lambda: None  # subscribe to state changes
        self._lock = threading.RLock()
        self._actors: dict[bytes, _ActorState] = {}  # actors not known to be dead
        peers.on_closed(self.on_connection_lost)
        ownership.on_owned_freed(self._handles_gone)

    # -- creation ---------------------------------------------------------------------------
    def wire_creation_args(self, args: tuple, kwargs: dict, name: str) -> tuple:
        """Constructor arguments as sent to the actor: refs resolved to payloads now."""
        tasks = self._tasks
        keep: list[ObjectRef] = []
        deps: list[ObjectRef] = []
        wire_args = tuple(tasks._wire_arg(a, keep, deps, name) for a in args)
        wire_kwargs = {k: tasks._wire_arg(v, keep, deps, name) for k, v in kwargs.items()}
        if deps:
            self._objects.wait_ready(deps, len(deps), None)
        failure = tasks.fill_ref_args(wire_args, wire_kwargs)
        if failure is not None:
            raise unpickle_error(failure[1])  # an argument's task failed
        return wire_args, wire_kwargs, keep

    def create(
        self, actor_id: bytes, info: dict, spec: bytes, keep: list, class_key: str
    ) -> _ActorState:
        """Record a new actor we own (its entry holds `keep`, the refs its arguments need)
        and ask the control loop to place it; what its handles call it through. The caller
        makes the first handle right after, so the entry lives while handles do."""
        self._ownership.new_owned(actor_id)
        self._objects.set_value(actor_id, ("actor", keep))
        state = self._state(actor_id)
        with self._lock:
            state.info = info
            state.state = "PENDING_CREATION"
            state.seq = 0
            state.creating = True
        self.follow_states()
        try:
            self._gcs.create_actor(actor_id.hex(), info, spec, function_keys=[class_key])
        finally:
            state.creating = False
        return state

    def _handles_gone(self, owned: Released) -> None:
        """Actors we created that nothing here refers to any more (no handle, no pending
        call): the control loop ends each once it has finished the calls it accepted."""
        if self._peers.shutting_down:
            return  # (a driver's actors end with it)
        for oid, obj in owned:
            if obj.value is not None and obj.value[0] == "actor":
                self._background(self._out_of_scope, oid)

    def _out_of_scope(self, actor_id: bytes) -> None:
        self._gcs.push_request("actor_out_of_scope", actor_id=actor_id.hex())

    # -- calls ------------------------------------------------------------------------------
    def submit(self, handle: Any, method: str, args: tuple, kwargs: dict, options: Any) -> list:
        """Call `method` on the actor of `handle` (anything with `_actor_id` and a
        `_caller_state` this submitter may cache there); the call's return refs."""
        state = handle._caller_state
        if state is None or state.registry is not self:
            state = handle._caller_state = self._state(handle._actor_id)
        task, refs, deps = self._tasks.prepare(method, args, kwargs, options, actor=state)
        with self._lock:
            task.unresolved = len(deps) + 1  # not sendable before its arguments are resolved
            state.queue.append(task)
            state.pending.add(task.task_id)
            if not state.pinned:
                state.pinned = self._pin(state.actor_id)
        if state.state == "UNKNOWN" and not state.looking_up:
            self._lookup(state)
        for dep in deps:
            self._objects.on_ready(dep, lambda t=task: self._argument_ready(t, True))
        self._argument_ready(task, bool(deps))
        return refs

    def _pin(self, actor_id: bytes) -> bool:
        """Count a reference to the actor for the pending calls (lock held); False when
        this process holds no reference to it to add to (nothing to keep alive then)."""
        refs = self._ownership.refs
        with refs.lock:
            obj = refs.objects.get(actor_id)
            if obj is None:
                return False
            obj.count += 1
            return True

    def _settle(self, state: _ActorState, task: Any) -> tuple[bool, bool]:
        """Take a call off the books (lock held): (it was pending, the actor's reference for
        pending calls is to be dropped now)."""
        if task.task_id not in state.pending:
            return False, False  # finished already (by a racing failure or reply)
        state.pending.discard(task.task_id)
        if state.pending or not state.pinned:
            return True, False
        state.pinned = False
        return True, True

    def _unpin(self, state: _ActorState) -> None:
        self._ownership.remove_local_ref(state.actor_id)

    def _argument_ready(self, task: Any, resolve: bool) -> None:
        """One of a call's arguments (or its submission) is done; send it once all are."""
        state = task.actor
        with self._lock:
            task.unresolved -= 1
            if task.unresolved or task.task_id not in state.pending:
                return  # still waiting, or finished already (cancelled, actor dead, ...)
        failure = self._tasks.fill_ref_args(task.args, task.kwargs) if resolve else None
        if failure is not None:
            with self._lock:
                if task in state.queue:
                    state.queue.remove(task)
            self._finish(task, [failure] * len(task.return_ids))
        self._pump(state)

    def _pump(self, state: _ActorState) -> None:
        """Send queued calls in order while the head of the queue is ready."""
        cancelled = []
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
                pending = state.pending
                while queue and queue[0].unresolved == 0:
                    task = queue.popleft()
                    if task.task_id not in pending:
                        continue  # finished already
                    if task.cancelled:
                        cancelled.append(task)
                        continue
                    state.inflight[task.task_id] = task
                    self._jobs.introduce(conn, task.job)
                    stream = task.stream
                    conn.send(
                        (
                            "actor_task",
                            task.task_id,
                            task.fn_key,
                            task.options.name,
                            task.args,
                            task.kwargs,
                            len(task.return_ids) if stream is None else stream.wire(),
                            task.job.job_id,
                            task.options.concurrency_group,
                            task.attempt,
                        )
                    )
        if failed:
            self._fail(state, failed, self._death_error(state))
        for task in cancelled:
            self._fail(state, [task], exceptions.TaskCancelledError(task.task_id.hex()))

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

        self._peers.peer_async(peer, connected)

    def on_done(self, task: Any, results: list) -> None:
        state = task.actor
        tasks = self._tasks
        first = results[0] if results else None
        if first is not None and first[0] == "e" and tasks.should_retry_error(task, first):
            with self._lock:
                state.inflight.pop(task.task_id, None)
                if task.task_id in state.pending:
                    if task.retries_left > 0:
                        task.retries_left -= 1
                    tasks.record_retry(task, first)
                    state.queue.appendleft(task)
            self._pump(state)
            return
        with self._lock:
            state.inflight.pop(task.task_id, None)
            pending, unpin = self._settle(state, task)
        if pending:
            tasks.finish(task, results)
        if unpin:
            self._unpin(state)

    def _finish(self, task: Any, results: list) -> None:
        state = task.actor
        with self._lock:
            pending, unpin = self._settle(state, task)
        if pending:
            self._tasks.finish(task, results)
        if unpin:
            self._unpin(state)

    def _fail(self, state: _ActorState, failed: list, error: BaseException) -> None:
        """Fail calls with one error (each once, whoever else is failing it meanwhile)."""
        unpin = False
        with self._lock:
            settled = []
            for task in failed:
                pending, last = self._settle(state, task)
                if pending:
                    settled.append(task)
                unpin = unpin or last
        for task in settled:
            self._tasks.fail(task, error)
        if unpin:
            self._unpin(state)

    def cancel(self, task: Any, force: bool) -> None:
        state = task.actor
        with self._lock:
            queued = task in state.queue
            if queued:
                state.queue.remove(task)
            sent = task.task_id in state.inflight
            conn = state.conn
        if queued:
            self._fail(state, [task], exceptions.TaskCancelledError(task.task_id.hex()))
            self._pump(state)  # calls behind it may go now
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
            self._reactor.call_later(DEATH_CAUSE_WAIT, self._fail_dying, state)
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
            self._tasks.record_retry(task, exceptions.ActorDiedError("the actor died", state.hex))
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
        self._fail(state, failed, error)

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
                    state = self._actors[actor_id] = _ActorState(actor_id, self)
        return state

    def _lookup(self, state: _ActorState) -> None:
        """Learn an actor's current state: subscribe first, then read the table."""
        state.looking_up = True

        def read() -> None:  # on the background thread: it may wait for Redis
            self.follow_states()
            try:
                info = self._gcs.actor(state.hex)
            except Exception as exc:
                if self._peers.shutting_down:
                    return
                if not is_connection_error(exc):  # (an outage is logged once, by health)
                    log.warning("reading actor %s's state failed (%s); retrying", state.hex, exc)
                self._reactor.call_later(LOOKUP_RETRY_SECONDS, self._background, read)
                return
            state.looking_up = False
            if info is None:
                info = {"state": "DEAD", "death_cause": "The actor does not exist.", "seq": 1 << 60}
            self._apply(state, info, from_table=True)

        self._background(read)

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
            if state.state == "DEAD" and self._actors.get(state.actor_id) is state:
                # Final: whoever still holds this state (a handle, a pending call) has all
                # it needs; calls failed below or by the pump.
                del self._actors[state.actor_id]
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

    def resync(self) -> None:
        """Re-read the state of every actor followed here (watcher thread, after the state
        subscription was made again: changes published meanwhile were missed)."""
        with self._lock:
            states = [s for s in self._actors.values() if not s.creating]
        if states:
            self._background(self._reread, states)

    def _reread(self, states: list[_ActorState]) -> None:
        """Apply the actors' entries as the table has them now (background thread).

        An actor missing from the table (Redis restarted without its data) is left alone
        while we are connected to it: its process still serves calls. One we are not
        connected to is taken as dead, or its calls would wait forever."""
        try:
            infos = self._gcs.actors([state.hex for state in states])
        except Exception as exc:
            if self._peers.shutting_down:
                return
            if not is_connection_error(exc):
                log.warning("re-reading the state of %d actors failed (%s)", len(states), exc)
            self._reactor.call_later(LOOKUP_RETRY_SECONDS, self._background, self._reread, states)
            return
        for state, info in zip(states, infos, strict=True):
            if state.creating:
                continue  # not written yet: absent from the table for now
            if info is None:
                conn = state.conn
                if conn is not None and not conn.closed:
                    continue
                info = {"state": "DEAD", "death_cause": "The actor does not exist.", "seq": 1 << 60}
            self._apply(state, info, from_table=True)

    def on_state(self, info: dict) -> None:
        """A published actor state change (from the process's watcher thread)."""
        state = self._actors.get(bytes.fromhex(info["actor_id"]))
        if state is not None:
            self._apply(state, info)
