"""Running pushed tasks and actor calls inside a worker process.

Normal tasks run one at a time on the process's main thread, so a cancellation can interrupt
them with a real signal (`KeyboardInterrupt` in the task, even in `time.sleep`). A worker
that receives an actor's creation becomes that actor for the rest of its life (see
`actor_runtime.py`). Whatever user code prints goes to its driver, prefixed as Ray does.
"""

from __future__ import annotations

import collections
import contextvars
import os
import signal
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from redray import exceptions
from redray.core import context
from redray.core.ids import return_id
from redray.core.jobs import Jobs
from redray.core.object_io import ObjectIO
from redray.core.ownership import Ownership
from redray.core.peers import Peers
from redray.core.serialization import error_payload, loads
from redray.core.task_submitter import TaskSubmitter
from redray.state import events as task_events
from redray.transport.connection import Connection
from redray.transport.reactor import Waiter

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # redray/
MAX_CANCELLED = 10_000  # cancels of calls not started yet, remembered until they come up

_task_context: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar(
    "redray_task_context", default=None
)


class TaskContext:
    """The task (or actor call) running on this thread or coroutine, and where its logs go."""

    __slots__ = (
        "task_id",
        "name",
        "job_id",
        "grant",
        "conn",
        "driver",
        "log_to_driver",
        "prefix",
        "function",
        "lent",
        "attempt",
        "started",
        "reported",
    )

    def __init__(self, task_id, name, job_id, grant, conn, driver=None, log_to_driver=True):
        self.task_id = task_id
        self.name = name
        self.job_id = job_id
        self.grant = grant
        self.conn = conn
        self.driver = driver
        self.log_to_driver = log_to_driver
        self.prefix = f"({name} pid={_PID})"
        self.function: Any = None  # what runs: get_runtime_context().get_task_function_name()
        self.lent: list | None = None  # refs in its return values, kept until the reply is sent
        self.attempt = 0  # the attempt number its owner gave it (for task events)
        self.started = 0.0  # when it started (wall clock)
        self.reported = False  # reported as running (task events: it ran an interval)


_PID = os.getpid()  # for log prefixes, without a system call per task


def _forked() -> None:
    global _PID
    _PID = os.getpid()


os.register_at_fork(after_in_child=_forked)


class Executor:
    """The task loop of a worker process."""

    def __init__(
        self,
        peers: Peers,
        ownership: Ownership,
        objects: ObjectIO,
        jobs: Jobs,
        tasks: TaskSubmitter,
        raylet: Connection,
    ):
        self.peers = peers
        self.ownership = ownership
        self.objects = objects
        self.jobs = jobs
        self.tasks = tasks
        self.raylet = raylet
        self.reactor = peers.reactor
        # What runs an actor's creation message (set by worker_main: see actor_runtime.py).
        self.create_actor: Callable[[Executor, Connection, tuple], None] | None = None
        self.blocked_depth = 0  # nested waits of the running task (its CPU is lent meanwhile)
        self.inbox: collections.deque[tuple[Connection, tuple]] = collections.deque()
        self._idle: Waiter | None = None  # set while the main thread waits for work
        self.current: TaskContext | None = None  # the normal task on the main thread
        self.actor: Any = None  # the ActorRuntime, once this worker became an actor
        # Calls cancelled before they started (refused when they come up); bounded, since a
        # cancel may cross its call's end.
        self._cancelled: OrderedDict[bytes, None] = OrderedDict()
        self._waiting: set[bytes] = set()  # tasks in the inbox, not started
        self._stolen: set[bytes] = set()  # ...of which these were given back to their owner
        self._waiting_lock = threading.Lock()
        self._interrupt: bytes | None = None
        self._main_thread = threading.get_ident()
        self._applied_grant: Any = None
        self._paths_added: set[str] = set()  # jobs whose import paths are in sys.path
        self._calls: collections.Counter = collections.Counter()  # of functions with max_calls
        self._retired = False  # a function reached its max_calls: this process runs no more
        # Calls running here (any thread), by task id: reported as running once they ran
        # an interval (task events), and their start goes back with their reply.
        self.running: dict[bytes, TaskContext] = {}
        node_id = getattr(context.current, "node_id", "") if context.current else ""
        self._process = (node_id, peers.address[2].hex(), os.getpid())
        if tasks.events is not None:
            tasks.events.running = self.running_events
        peers.handle("task", self._on_task)
        peers.handle("steal", self._on_steal)
        peers.handle("actor_create", self._on_message)
        peers.handle("actor_task", self._on_actor_task)
        peers.handle("cancel", self._on_cancel)
        peers.handle("actor_control", self._on_actor_control)
        peers.handle("exit", lambda conn, message: os._exit(0))
        peers.on_closed(self.on_connection_lost)
        jobs.current_task = self.context
        objects.blocking = self.lending_cpu
        signal.signal(signal.SIGINT, self._on_sigint)
        sys.stdout = TaskStream(self, 1, sys.stdout)
        sys.stderr = TaskStream(self, 2, sys.stderr)

    def running_task(self) -> bool:
        """True while a normal task runs here (its CPU can be lent while it blocks)."""
        return self.current is not None and self.actor is None

    def lending_cpu(self, wait: Callable[[], Any]) -> Any:
        """Run wait() (a blocking get or wait), lending the running task's CPU back to the
        raylet meanwhile, so tasks it waits for can run (no deadlock on a full node)."""
        if not self.running_task():
            return wait()
        self.blocked_depth += 1
        if self.blocked_depth == 1:
            self.raylet.send(("blocked",))
        try:
            return wait()
        finally:
            self.blocked_depth -= 1
            if self.blocked_depth == 0:
                self.raylet.send(("unblocked",))

    def context(self) -> TaskContext | None:
        ctx = _task_context.get() or self.current
        if ctx is None and self.actor is not None:
            return self.actor.context
        return ctx

    def post(self, conn: Connection, message: tuple) -> None:
        """Queue a task or call for the main thread (from any thread)."""
        self.inbox.append((conn, message))
        idle = self._idle
        if idle is not None:
            idle.set()

    def _next(self) -> tuple[Connection, tuple]:
        """The next queued message; while there is none, the main thread runs the reactor
        loop, so a task arriving wakes it directly (see Reactor.block)."""
        inbox = self.inbox
        reactor = self.reactor
        # Poll before sleeping only where this thread runs what comes: not in an async or
        # threaded actor, whose calls run on other threads (which need the interpreter). An
        # async actor's event-loop thread runs the reactor loop itself when idle.
        actor = self.actor
        spin = actor is None or not (actor.is_async or actor.threaded)
        lead = actor is None or not actor.is_async
        while not inbox:
            waiter = self._idle = reactor.waiter()
            if not inbox:  # (post() may have run before _idle was set)
                reactor.block(waiter, spin=spin, lead=lead)
        self._idle = None
        return inbox.popleft()

    # -- reactor thread ---------------------------------------------------------------------
    def _on_message(self, conn: Connection, message: tuple) -> None:
        self.post(conn, message)

    def _on_actor_task(self, conn: Connection, message: tuple) -> None:
        if self.actor is None:
            error = exceptions.RaySystemError("this worker is not an actor")
            self.refuse(conn, message[1], error, message[6])
            return
        self.actor.accept(conn, message)

    def _on_task(self, conn: Connection, message: tuple) -> None:
        with self._waiting_lock:
            self._waiting.add(message[1])
        self.post(conn, message)

    def _on_steal(self, conn: Connection, message: tuple) -> None:
        """Give back the named tasks that have not started (their owner runs them elsewhere)."""
        with self._waiting_lock:
            stolen = [task_id for task_id in message[1] if task_id in self._waiting]
            self._waiting.difference_update(stolen)
            self._stolen.update(stolen)
        if stolen:
            conn.send(("stolen", stolen))

    def _on_actor_control(self, conn: Connection, message: tuple) -> None:
        """A new control loop (after a head failover) now watches this actor."""
        if self.actor is not None:
            self.actor.control = conn

    def _on_cancel(self, conn: Connection, message: tuple) -> None:
        _, task_id, force, recursive = message
        if recursive:
            self.tasks.cancel_children(task_id, force)
        if self.actor is not None and self.actor.cancel(task_id):
            return
        with self._waiting_lock:  # (a task leaves _waiting as it becomes `current`)
            current = self.current
            running = current is not None and current.task_id == task_id
            if not running and (self.actor is not None or task_id in self._waiting):
                self._remember_cancel(task_id)
        if running:
            if force:
                os._exit(1)
            self._interrupt = task_id
            signal.pthread_kill(self._main_thread, signal.SIGINT)

    def cancel_before_start(self, task_id: bytes) -> None:
        """Refuse the call `task_id` when it comes up (it has not started yet)."""
        with self._waiting_lock:
            self._remember_cancel(task_id)

    def _remember_cancel(self, task_id: bytes) -> None:
        """(waiting lock held) Bounded: a cancel may cross the end of its call."""
        self._cancelled[task_id] = None
        if len(self._cancelled) > MAX_CANCELLED:
            self._cancelled.popitem(last=False)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        current = self.current
        if current is not None and self._interrupt == current.task_id:
            self.reactor.keyboard_interrupt()

    _on_sigint.defers_in_reactor = True  # type: ignore[attr-defined]

    def on_connection_lost(self, conn: Connection) -> None:
        if self.actor is not None:
            self.actor.on_connection_lost(conn)

    # -- main thread ------------------------------------------------------------------------
    def run(self) -> None:
        while True:
            try:
                conn, message = self._next()
                kind = message[0]
                if kind == "task":
                    self.execute(conn, message)
                elif kind == "actor_task":
                    self.actor.execute(conn, message)
                elif kind == "actor_create":
                    self.create_actor(self, conn, message)
            except KeyboardInterrupt:
                continue  # a cancellation that arrived just after its task ended

    def execute(self, conn: Connection, message: tuple) -> None:
        _, task_id, fn_key, name, args, kwargs, num_returns, grant, job_id, attempt = message
        with self._waiting_lock:
            if task_id in self._stolen:
                self._stolen.discard(task_id)
                return  # given back to its owner, which runs it elsewhere
        if self._retired:  # its owner runs it on another worker
            with self._waiting_lock:
                self._waiting.discard(task_id)
            conn.send(("retire", (grant or {}).get("lease_id")))
            conn.send(("stolen", [task_id]))
            return
        if grant != self._applied_grant:
            self._apply_grant(grant)
        ctx = self.task_context(task_id, name, job_id, grant, conn)
        ctx.attempt = attempt
        with self._waiting_lock:  # from waiting to running in one step, as cancels see it
            self._waiting.discard(task_id)
            cancelled = self._cancelled.pop(task_id, True) is None
            if not cancelled:
                self.current = ctx
        if cancelled:
            self.refuse(conn, task_id, exceptions.TaskCancelledError(task_id.hex()), num_returns)
            return
        try:
            try:
                fn = self.jobs.load_function(fn_key, conn)
            except Exception as exc:
                fn = None
                payloads = [error_payload(task_error(name, exc))] * num_returns
            else:
                ctx.function = fn
                payloads = self.invoke(ctx, fn, args, kwargs, num_returns)
        finally:
            self._interrupt = None
            self.current = None
        self.reply(conn, task_id, payloads, ctx)
        if type(fn) is CallLimit:
            self._count_call(fn_key, fn.max_calls, conn, grant)

    def _count_call(self, fn_key: str, max_calls: int, conn: Connection, grant: Any) -> None:
        """After max_calls tasks of one function this worker retires (as Ray's): its owner
        pushes nothing more and returns the lease, and the raylet ends the process once
        it holds no lease (a new one takes its place). Tasks that reach it meanwhile go
        back to their owner unstarted."""
        self._calls[fn_key] += 1
        if self._calls[fn_key] < max_calls:
            return
        self._retired = True
        conn.send(("retire", (grant or {}).get("lease_id")))
        self.raylet.send(("retiring",))

    def refused_as_cancelled(self, conn: Connection, task_id: bytes, num_returns: int) -> bool:
        """A task or call cancelled before it started: reply TaskCancelledError (True)."""
        if not self._cancelled:  # (the usual case, without the lock)
            return False
        with self._waiting_lock:
            if self._cancelled.pop(task_id, True) is not None:
                return False
        self.refuse(conn, task_id, exceptions.TaskCancelledError(task_id.hex()), num_returns)
        return True

    def task_context(self, task_id, name, job_id, grant, conn) -> TaskContext:
        """The context of a task of job_id, whose paths are made importable here first;
        the task counts as running from now (see `running_events`)."""
        job = self.jobs.jobs.get(job_id)
        if job is None:
            ctx = TaskContext(task_id, name, job_id, grant, conn)
        else:
            if job_id not in self._paths_added:
                self._paths_added.add(job_id)
                for path in job.paths:
                    if path not in sys.path:
                        sys.path.append(path)
            ctx = TaskContext(task_id, name, job_id, grant, conn, job.driver, job.log_to_driver)
        ctx.started = time.time()
        self.running[task_id] = ctx
        events = self.tasks.events
        if events is not None:
            events.arm()
        return ctx

    def running_events(self) -> tuple[list[tuple], bool]:
        """(reactor thread, task events) RUNNING events of the calls running here for an
        interval and not reported yet; and whether anything runs."""
        running = list(self.running.values())
        if not running:
            return [], False
        since = time.time() - self.tasks.events.interval
        events = []
        for ctx in running:
            if not ctx.reported and ctx.started <= since:
                ctx.reported = True
                events.append(
                    (
                        task_events.RUNNING,
                        ctx.task_id,
                        ctx.attempt,
                        ctx.started,
                        ctx.name,
                        ctx.job_id,
                    )
                )
        return events, True

    def invoke(self, ctx: TaskContext, fn: Any, args: tuple, kwargs: dict, num_returns: int):
        """Run fn for a task or actor call; the payloads of its returns (or of its error)."""
        token = _task_context.set(ctx)
        try:
            call_args, call_kwargs = self.materialize_args(args, kwargs)
            result = fn(*call_args, **call_kwargs)
            del call_args, call_kwargs
            return self.return_payloads(result, num_returns, ctx)
        except KeyboardInterrupt as exc:
            if self._interrupt == ctx.task_id:  # cancel() interrupted it
                error = exceptions.TaskCancelledError(ctx.task_id.hex())
            else:  # raised by the user's code: the call fails, the worker goes on
                error = interrupted_error(ctx.name, ctx.task_id, exc)
            return [error_payload(error)] * num_returns
        except Exception as exc:
            return [error_payload(task_error(ctx.name, exc))] * num_returns
        finally:
            _flush_streams()
            _task_context.reset(token)

    def materialize_args(self, args: tuple, kwargs: dict) -> tuple[list, dict]:
        """Arguments as the function sees them; refs that arrive inside them are borrowed."""
        if not args and not kwargs:
            return [], {}
        with context.deserializing() as scope:
            call_args = [self._arg(a) for a in args]
            call_kwargs = {k: self._arg(v) for k, v in kwargs.items()}
        if scope.refs:
            self.ownership.register_borrows(scope.refs, via_task=True)
        return call_args, call_kwargs

    def _arg(self, item: Any) -> Any:
        if type(item) is bytes:
            return loads(item)
        oid, payload = item
        return self.objects.materialize(oid, payload)

    def return_payloads(self, result: Any, num_returns: int, ctx: TaskContext) -> list[tuple]:
        """Serialize a task's return values for its caller (who owns them). Refs inside
        them are lent to the caller and kept here (`ctx.lent`) until the reply is sent
        (`reply`): our release of them must not reach their owner before the reply does."""
        name = ctx.name
        if num_returns == 1:
            values = [result]
        elif num_returns == 0:
            if result is not None:
                raise ValueError(f"Task {name} has num_returns=0 but returned {result!r}.")
            values = []
        else:
            if not isinstance(result, (tuple, list)) or len(result) != num_returns:
                got = len(result) if isinstance(result, (tuple, list)) else 1
                raise ValueError(
                    f"Task {name} returned {got} objects, but num_returns={num_returns}."
                )
            values = list(result)
        caller = ctx.conn.info.get("peer_id")
        payloads = []
        for index, value in enumerate(values):
            oid = return_id(ctx.task_id, index)
            payload, refs = self.objects.serialize_value(
                value, oid, "the return value", owner_id=caller
            )
            if refs:  # refs inside a return value: the caller borrows them before seeing them
                self.ownership.lend([(r._id, r._owner) for r in refs], caller)
                ctx.lent = refs if ctx.lent is None else ctx.lent + refs
            payloads.append(payload)
        return payloads

    def reply(self, conn: Connection, task_id: bytes, payloads: list, ctx: TaskContext) -> None:
        """Send a task's or call's results to its caller, with the borrows its arguments
        left here; then let go of the refs its return values lent."""
        borrowed = self.ownership.take_task_borrows()
        self.running.pop(task_id, None)
        if self.tasks.events is None:  # (task events off: its owner records nothing either)
            self.peers.route_to(conn).send(("done", task_id, payloads, borrowed))
        else:
            run = (ctx.started, ctx.reported, *self._process)
            self.peers.route_to(conn).send(("done", task_id, payloads, borrowed, run))
        ctx.lent = None

    def refuse(self, conn: Connection, task_id: bytes, error: BaseException, num_returns: int):
        """Answer a task or call that will not run here with `error` for each return."""
        self.running.pop(task_id, None)
        self.peers.route_to(conn).send(("done", task_id, [error_payload(error)] * num_returns, []))

    def _apply_grant(self, grant: Any) -> None:
        """Make the lease's resources visible to user code (GPU ids as CUDA_VISIBLE_DEVICES)."""
        self._applied_grant = grant
        gpu_ids = (grant or {}).get("gpu_ids")
        if gpu_ids:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpu_ids)
        else:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)


class CallLimit:
    """A remote function exported with `max_calls`: the worker that ran it that many times
    is replaced by a fresh process (to release what the function leaks, e.g. GPU memory)."""

    __slots__ = ("function", "max_calls")

    def __init__(self, function: Any, max_calls: int):
        self.function = function
        self.max_calls = max_calls

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    @property
    def __code__(self) -> Any:  # so remote tracebacks name the function's source file
        return self.function.__code__

    @__code__.setter
    def __code__(self, code: Any) -> None:
        self.function.__code__ = code


def task_error(name: str, exc: BaseException) -> exceptions.RayTaskError:
    """The error a caller sees for an exception raised by task `name`."""
    if isinstance(exc, exceptions.RayTaskError):
        return exc  # a failed dependency or nested get: keep the original error
    tb = "".join(traceback.format_exception(type(exc), exc, _user_frames(exc)))
    try:
        import cloudpickle

        cloudpickle.dumps(exc)
        cause = exc
    except Exception:
        cause = None
    return exceptions.RayTaskError(name, tb, cause, proctitle=f"ray::{name}()", ip=_node_ip())


def interrupted_error(name: str, task_id: bytes, exc: KeyboardInterrupt) -> exceptions.RayTaskError:
    """What a caller sees for a task or call whose own code raised KeyboardInterrupt: as in
    Ray, a RayTaskError that is also a TaskCancelledError, with the user's frames."""
    cancelled = exceptions.TaskCancelledError(task_id.hex())
    frames = _user_frames(exc)
    tb = "".join(traceback.format_tb(frames)) if frames is not None else ""
    tb = f"Traceback (most recent call last):\n{tb}redray.exceptions.TaskCancelledError: {cancelled}\n"
    return exceptions.RayTaskError(name, tb, cancelled, proctitle=f"ray::{name}()", ip=_node_ip())


def _user_frames(exc: BaseException) -> Any:
    """The traceback of exc from the user's code on, not from our calls into it."""
    frames = exc.__traceback__
    while frames is not None and frames.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frames = frames.tb_next
    return frames


def _node_ip() -> str | None:
    return (context.current.node or {}).get("node_ip_address") if context.current else None


class TaskStream:
    """sys.stdout/sys.stderr of a worker: lines printed by user code go to its driver."""

    def __init__(self, executor: Executor, fd: int, original: Any):
        self._executor = executor
        self._fd = fd
        self._original = original
        self._buffer: list[str] = []
        self._lock = threading.Lock()
        self.encoding = getattr(original, "encoding", "utf-8")

    def write(self, text: str) -> int:
        if self._executor.context() is None:
            return self._original.write(text)
        with self._lock:
            self._buffer.append(text)
        if "\n" in text:
            self._send(complete_lines_only=True)
        return len(text)

    def flush(self) -> None:
        if not self._buffer:  # (after every task: the common case is nothing to send)
            self._original.flush()
            return
        self._send(complete_lines_only=False)

    def _send(self, complete_lines_only: bool) -> None:
        ctx = self._executor.context()
        with self._lock:
            if not self._buffer:
                if not complete_lines_only:
                    self._original.flush()
                return
            text = "".join(self._buffer)
            if complete_lines_only:
                cut = text.rfind("\n") + 1
                text, rest = text[:cut], text[cut:]
                self._buffer = [rest] if rest else []
            else:
                self._buffer = []
            if not text:
                return
        if ctx is None:
            self._original.write(text)
            self._original.flush()
            return
        send_log(self._executor.peers, ctx, self._fd, text, self._original)

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._original.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


def send_log(peers: Peers, ctx: TaskContext, fd: int, text: str, fallback: Any) -> None:
    """Write printed text to this worker's log file (`fallback`: its stdout or stderr, where
    `redray logs` reads it) and send it to the job's driver: on the task's connection when
    that is the driver."""
    fallback.write(text)
    if not ctx.log_to_driver:
        return
    entry = ("log", [(fd, ctx.prefix, text)])
    driver = ctx.driver
    conn = ctx.conn
    if conn is not None and (driver is None or conn.info.get("peer") == driver):
        conn.send(entry)
        return
    if driver is None:
        return
    try:
        peers.peer(tuple(driver)).send(entry)
    except OSError:
        pass


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
