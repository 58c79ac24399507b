"""One I/O thread per process that owns every socket (see connection.py): frames in,
handlers out, timers, calls from other threads.

A thread that blocks for something the reactor will produce (a reply, a task) runs the
reactor loop itself meanwhile (`Reactor.block`): the I/O thread lends it the loop and sleeps.
The reply then wakes the waiting thread directly, instead of waking the I/O thread which
wakes the waiting thread. When the waiter is done it leaves the loop *free* without waking
the I/O thread (a cross-CPU wake-up costs ~10 µs, a round trip's worth of Python): if it
blocks again soon, as a caller making synchronous calls or a worker running short tasks
does, it takes the loop straight back. The lent-out I/O thread checks every
`PARKED_CHECK_SECONDS` and takes a loop left free, so messages arriving while the waiter runs
user code wait about that long at most; after a long wait it is woken at once instead.

The thread running the loop must never block for what the loop itself produces: `block` on
that thread raises `LoopBlockedError` instead of waiting forever. Once the reactor is stopped,
every thread blocked in it (or blocking later) gets `ReactorStoppedError`.
"""

from __future__ import annotations

import _signal
import collections
import errno
import heapq
import itertools
import logging
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from redray import exceptions
from redray.transport import protocol
from redray.transport.admission import Admission
from redray.transport.connection import Connection, Handler
from redray.transport.loglimit import LimitedLog
from redray.transport.spinning import SpinPolicy

log = logging.getLogger(__name__)
_limited = LimitedLog(log)

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
_RECV_SIZE = 1 << 18
PARKED_CHECK_SECONDS = 0.001
ACCEPTS_PER_PASS = 64  # a flood of connections cannot hold the loop in one listener
# Out of descriptors (or kernel memory): stop accepting this long, leaving the backlog to
# the kernel, instead of spinning on a listener that stays readable.
ACCEPT_PAUSE_SECONDS = 0.1
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class ReactorStoppedError(exceptions.RaySystemError):
    """The reactor was stopped (the process shut redray down) while a thread waited in it."""


class LoopBlockedError(RuntimeError):
    """A blocking wait was made on the thread running the reactor loop: from a message
    handler or a callback. It would wait forever for a reply only that thread can read."""


class Waiter:
    """A one-shot wake-up for a thread blocked in `Reactor.block`; `set` from any thread."""

    __slots__ = ("_reactor", "_lock", "done", "leading", "thread")

    def __init__(self, reactor: Reactor):
        self._reactor = reactor
        self._lock = threading.Lock()
        self._lock.acquire()
        self.done = False
        self.leading = False  # the blocked thread runs the reactor loop
        self.thread = 0

    def set(self) -> None:
        reactor = self._reactor
        with reactor._role:
            if self.done:
                return
            self.done = True
            if not self.leading:
                # Asleep (the lock is released once at most: here or by a grant).
                if self._lock.locked():
                    self._lock.release()
                return
            # Running the loop: it sees `done` after the event being handled, unless set
            # from another thread (a pub/sub message, a user thread) while it sleeps there.
            if self.thread == threading.get_ident():
                return
        reactor._wake()


class Reactor:
    """The process's I/O thread: sockets, timers and cross-thread calls."""

    def __init__(self, token: bytes, name: str = "redray-io"):
        self.token = token
        self._selector = selectors.DefaultSelector()
        self._calls: collections.deque[tuple[Callable, tuple]] = collections.deque()
        self._timers: list[tuple[float, int, Callable, tuple]] = []
        self._seq = itertools.count()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._woken = False
        self._selector.register(self._wake_r, _READ, None)
        self._connections: dict[int, Connection] = {}
        self._listeners: dict[int, tuple[socket.socket, Callable]] = {}
        # By listening address: (anyone, this user's local peers); see `listen`.
        self._admissions: dict[tuple[str, int], tuple[Admission, Admission]] = {}
        self._stopping = False
        self._stop_reason = "the I/O loop of this process was stopped"
        self._closed = False  # (role lock) sockets closed: nothing may be registered any more
        self._sleepers: set[Waiter] = set()  # (role lock) threads asleep in `block`
        self._role = threading.Lock()  # guards who runs the loop (the fields below)
        # The ident of the thread running the loop; 0: free (see the module doc); -1: the
        # I/O thread, before it has started.
        self._leader = -1
        self._borrower: Waiter | None = None  # a blocked thread asking for the loop
        self._lead_since = 0.0  # when the current borrower took the loop
        self._freed_at = 0.0  # when the loop was last left free
        self._io_deep = False  # the lent-out I/O thread sleeps until woken
        self._kicked = False  # ...and is asked to take the loop at once
        self._parked = threading.Condition(self._role)  # where it sleeps
        self.interrupted = False  # a deferred SIGINT waits to be raised
        self._spin = SpinPolicy()
        # Reads land here first: a fresh buffer per recv would cost an mmap/munmap pair.
        self.scratch = memoryview(bytearray(_RECV_SIZE))
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    # -- public -------------------------------------------------------------------------
    def call_soon(self, fn: Callable, *args: Any) -> None:
        """Run fn(*args) on the reactor thread."""
        self._calls.append((fn, args))
        self._wake()

    def call_later(self, delay: float, fn: Callable, *args: Any) -> None:
        """Run fn(*args) on the reactor thread after `delay` seconds."""
        entry = (time.monotonic() + delay, next(self._seq), fn, args)
        self.call_soon(heapq.heappush, self._timers, entry)

    def _call_at(self, when: float, fn: Callable, *args: Any) -> None:
        """(reactor thread) Run fn(*args) at monotonic time `when`."""
        heapq.heappush(self._timers, (when, next(self._seq), fn, args))

    def in_reactor(self) -> bool:
        """True on the thread running the loop (the I/O thread, or a thread it lent it to)."""
        return threading.get_ident() == self._leader

    def waiter(self) -> Waiter:
        return Waiter(self)

    def block(
        self, waiter: Waiter, timeout: float | None = None, spin: bool = False, lead: bool = True
    ) -> bool:
        """Sleep until waiter is set (True) or timeout passes (False).

        Meanwhile this thread runs the reactor loop itself when it can get it, so what sets
        the waiter (a reply on a socket) wakes this thread directly. With `spin` it polls
        the loop a moment before sleeping when that is likely to pay (see spinning.py):
        for threads that do the work themselves, not those handing it to other threads. The
        main thread leads only while SIGINT's handler defers KeyboardInterrupt (see
        `keyboard_interrupt`): it must never land inside a message handler. With `lead`
        False it just sleeps (leaving the loop to threads that should run it).

        Raises LoopBlockedError on the thread running the loop (nothing could set the
        waiter), and ReactorStoppedError once the reactor is stopped.
        """
        if waiter.done:
            return True
        if threading.get_ident() == self._leader:
            raise LoopBlockedError(
                "a blocking redray call (get, put of a large object, a request to the raylet "
                "or another process) was made on the thread that runs redray's I/O loop, from "
                "a message handler or a callback; it would wait forever for a reply only that "
                "thread can read"
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        while not waiter.done:
            if self._stopping:
                raise ReactorStoppedError(self._stop_reason)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            leading = lead and self._may_lead() and self._take_or_ask(waiter)
            if not leading:
                leading = self._sleep(waiter, left)
            if leading:
                try:
                    self._lead(waiter, deadline, spin)
                finally:
                    self._leave(waiter)
                if self.interrupted and waiter.thread == threading.main_thread().ident:
                    self.interrupted = False
                    raise KeyboardInterrupt
        return True

    def _sleep(self, waiter: Waiter, left: float | None) -> bool:
        """Sleep until waiter is set, the loop is lent to us (True), the time is up or the
        reactor stops. Registered meanwhile, so that `stop` can wake us."""
        with self._role:
            if self._stopping or waiter.done:
                if self._borrower is waiter:
                    self._borrower = None
                # The loop may have been lent to us since we asked: then we must lead (and
                # so leave it), or nobody would run it ever again.
                return waiter.leading
            self._sleepers.add(waiter)
        waiter._lock.acquire(timeout=-1 if left is None else left)
        with self._role:
            self._sleepers.discard(waiter)
            if self._borrower is waiter:
                self._borrower = None
            return waiter.leading

    def _take_or_ask(self, waiter: Waiter) -> bool:
        """Take the loop if it is free (True); else ask the I/O thread to lend it."""
        waiter.thread = threading.get_ident()
        with self._role:
            if waiter.done or self._stopping:
                return False
            if self._leader == 0:
                self._leader = waiter.thread
                self._lead_since = time.monotonic()
                waiter.leading = True
                return True
            ask = self._borrower is None
            if ask:
                self._borrower = waiter
        if ask:
            self._wake()
        return False

    def _leave(self, waiter: Waiter) -> None:
        """Leave the loop free; wake the I/O thread only if it stopped checking."""
        with self._role:
            waiter.leading = False
            self._leader = 0
            self._freed_at = time.monotonic()
            if self._io_deep:
                self._kick()

    def ensure_running(self) -> None:
        """Have the loop run at once: for a thread about to wait for something the reactor
        produces without running the loop itself (as `block` does)."""
        if self._leader:
            return
        with self._role:
            if self._leader == 0:
                self._kick()

    def _kick(self) -> None:
        """(role lock held) Wake the parked I/O thread to take the free loop now."""
        self._io_deep = False
        self._kicked = True
        self._parked.notify()

    def block_until_readable(self, fd: int, timeout: float | None, spin: bool = False) -> None:
        """Block (as `block`, running the loop meanwhile) until fd is readable or timeout
        passes: for a thread that also waits on a selector of its own (an event loop)."""
        waiter = self.waiter()
        watch = {"on": False}

        def readable() -> None:  # on the loop: a one-shot watch (epoll is level-triggered)
            if watch["on"]:
                watch["on"] = False
                self._selector.unregister(fd)
            waiter.set()

        def start() -> None:
            if not waiter.done and not watch["on"]:
                watch["on"] = True
                try:
                    self._selector.register(fd, _READ, readable)
                except KeyError:  # (an earlier watch not yet stopped: take it over)
                    self._selector.modify(fd, _READ, readable)

        def stop() -> None:
            if watch["on"]:
                watch["on"] = False
                self._selector.unregister(fd)

        self.call_soon(start)
        try:
            self.block(waiter, timeout, spin=spin)
        finally:
            waiter.set()  # a start still queued does nothing now
            self.call_soon(stop)

    def keyboard_interrupt(self) -> None:
        """Raise KeyboardInterrupt in the calling (main) thread: at once, or, when it is
        running the reactor loop, as soon as it hands the loop back. For SIGINT handlers,
        which mark themselves with `defers_in_reactor = True`."""
        if self._leader == threading.get_ident():
            self.interrupted = True
            self._wake()
            return
        raise KeyboardInterrupt

    def _may_lead(self) -> bool:
        ident = threading.get_ident()
        if ident == self._leader:
            return False
        if ident == threading.main_thread().ident:
            # (signal.getsignal would cost ~10 µs: it tries to make an enum of the handler)
            return getattr(_signal.getsignal(signal.SIGINT), "defers_in_reactor", False)
        return True

    def _wake(self) -> None:
        if not self._woken:
            self._woken = True
            try:
                os.write(self._wake_w, b"x")
            except (BlockingIOError, OSError):
                pass

    def _lead(self, waiter: Waiter, deadline: float | None, spin: bool) -> None:
        # (`interrupted` is only ever set while the main thread leads)
        start = time.monotonic()
        if spin:
            until = start + self._spin.budget()
            if deadline is not None and deadline < until:
                until = deadline
            while not waiter.done and not self.interrupted and time.monotonic() < until:
                self._run_once(0.0)
        while not waiter.done and not self._stopping and not self.interrupted:
            if deadline is None:
                self._run_once(None)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._run_once(left)
        if spin:
            self._spin.waited(time.monotonic() - start)

    def _lend(self) -> None:
        """On the I/O thread: give the loop to the blocked thread asking for it."""
        with self._role:
            waiter, self._borrower = self._borrower, None
            if waiter is None or waiter.done or self._stopping:
                return
            waiter.leading = True
            self._leader = waiter.thread
            self._lead_since = time.monotonic()
            waiter._lock.release()
        self._park()

    def _park(self) -> None:
        """On the I/O thread while the loop is lent out: take it back once it is left free
        (checking every PARKED_CHECK_SECONDS), or sleep until woken while a borrower keeps
        it longer than that (it is blocked for a while: no point in checking)."""
        check = PARKED_CHECK_SECONDS
        with self._parked:
            while True:
                now = time.monotonic()
                if self._leader == 0:
                    # Left free just now: its borrower is likely back in a moment.
                    if self._kicked or self._stopping or now - self._freed_at >= check / 2:
                        self._leader = threading.get_ident()
                        self._kicked = self._io_deep = False
                        return
                    self._parked.wait(check)
                elif self._stopping or now - self._lead_since >= check:
                    self._io_deep = True
                    self._parked.wait()
                else:
                    self._parked.wait(check)

    def listen(
        self,
        host: str,
        port: int,
        handler: Handler,
        on_close: Callable[[Connection], None] | None = None,
        on_accept: Callable[[Connection], None] | None = None,
        local: bool = True,
    ) -> tuple[str, int]:
        """Accept authenticated connections on host:port (0 = any free port), and with
        `local` on the matching abstract Unix socket for peers on this machine (see
        protocol.connect). A bounded number of connections may wait for their handshake,
        each for `protocol.HANDSHAKE_TIMEOUT` (admission.py): those of our own user over the
        Unix socket (the kernel vouches for their uid) in a table of their own, so that a
        flood from anyone else cannot crowd out this machine's drivers and workers."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        address = sock.getsockname()[:2]
        sockets = [sock]
        if local and hasattr(socket, "AF_UNIX"):
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                unix.bind(protocol.local_name(*address))
                sockets.append(unix)
            except OSError:  # not Linux, or the name is taken: TCP only
                unix.close()
        name = f"listener {address[0]}:{address[1]}"
        admissions = (
            Admission(name, self._call_at),
            Admission(f"{name} (this user's local peers)", self._call_at),
        )
        self.call_soon(self._admissions.__setitem__, tuple(address), admissions)
        for listener in sockets:
            listener.listen(1024)
            listener.setblocking(False)
            accept = self._acceptor(listener, admissions, handler, on_close, on_accept)
            self.call_soon(self._add_listener, listener, accept)
        return address

    def stop_listening(self, address: tuple[str, int]) -> None:
        """Close the listener on address (TCP and Unix socket) and its connections still
        waiting for their handshake; connections already made stay."""
        self.call_soon(self._remove_listener, tuple(address))

    def _acceptor(
        self,
        sock: socket.socket,
        admissions: tuple[Admission, Admission],
        handler: Handler,
        on_close: Callable[[Connection], None] | None,
        on_accept: Callable[[Connection], None] | None,
    ) -> Callable[[], None]:
        anyone, own_user = admissions
        unix = sock.family == getattr(socket, "AF_UNIX", None)
        uid = os.getuid()

        def accept() -> None:
            for _ in range(ACCEPTS_PER_PASS):
                try:
                    client, _ = sock.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    if exc.errno in _OUT_OF_RESOURCES:
                        self._pause_listener(sock, accept, anyone.name, exc)
                        return
                    continue  # (that connection was reset before we took it)
                admission = anyone
                if unix:
                    try:
                        if protocol.peer_uid(client) == uid:
                            admission = own_user
                    except OSError:
                        pass
                nonce = protocol.server_challenge()
                conn = Connection(
                    self, client, handler, on_close, pending_auth=nonce, admission=admission
                )
                admission.admit(conn)
                self._register(conn)
                conn.send_bytes(nonce)
                if on_accept is not None:
                    on_accept(conn)

        return accept

    def _pause_listener(
        self, sock: socket.socket, accept: Callable, name: str, exc: OSError
    ) -> None:
        _limited.warning(
            "accept",
            "%s cannot accept connections (%s); pausing it for %g s",
            name,
            exc.strerror,
            ACCEPT_PAUSE_SECONDS,
        )
        self._selector.unregister(sock)
        self._call_at(time.monotonic() + ACCEPT_PAUSE_SECONDS, self._resume_listener, sock, accept)

    def _resume_listener(self, sock: socket.socket, accept: Callable) -> None:
        if self._listeners.get(sock.fileno(), (None,))[0] is sock:
            self._selector.register(sock, _READ, accept)

    def connect(
        self,
        address: tuple[str, int],
        handler: Handler,
        on_close: Callable[[Connection], None] | None = None,
        timeout: float = 10.0,
    ) -> Connection:
        """Open an authenticated connection (blocking handshake) and start reading it."""
        sock = protocol.connect(tuple(address), self.token, timeout)
        conn = Connection(self, sock, handler, on_close)
        self._register_soon(conn)
        return conn

    def adopt(
        self,
        sock: socket.socket,
        handler: Handler,
        on_close: Callable[[Connection], None] | None = None,
    ) -> Connection:
        """Register an already-trusted socket (e.g. one end of a socketpair)."""
        conn = Connection(self, sock, handler, on_close)
        self._register_soon(conn)
        return conn

    def _register_soon(self, conn: Connection) -> None:
        """Have the loop read conn; once the reactor has closed its sockets, close conn too
        (it would never be read, nor closed) and raise ConnectionError."""
        with self._role:
            closed = self._closed
            if not closed:
                self._calls.append((self._register, (conn,)))
        if closed:
            conn.closed = True
            conn.sock.close()
            raise ConnectionError(self._stop_reason)
        self._wake()

    def stop(self, reason: str | None = None) -> None:
        """Close every socket and end the thread; threads blocked in `block` (now or later)
        get ReactorStoppedError(reason)."""
        with self._role:
            if reason is not None and not self._stopping:
                self._stop_reason = reason
            self._stopping = True
            self._parked.notify()
            for waiter in self._sleepers:
                if waiter._lock.locked():
                    waiter._lock.release()
        self.call_soon(lambda: None)
        if not self.in_reactor():
            self.thread.join(timeout=5)

    @property
    def stopped(self) -> bool:
        return self._stopping

    # -- reactor thread -----------------------------------------------------------------
    def _add_listener(self, sock: socket.socket, accept: Callable) -> None:
        self._listeners[sock.fileno()] = (sock, accept)
        self._selector.register(sock, _READ, accept)

    def _remove_listener(self, address: tuple[str, int]) -> None:
        for fd, (sock, _) in list(self._listeners.items()):
            try:
                name = sock.getsockname()
            except OSError:
                continue
            if name == protocol.local_name(*address) or tuple(name[:2]) == address:
                del self._listeners[fd]
                try:
                    self._selector.unregister(sock)
                except (KeyError, ValueError):
                    pass  # (paused: out of descriptors)
                sock.close()
        for admission in self._admissions.pop(address, ()):
            admission.close_all()

    def _register(self, conn: Connection) -> None:
        if conn.closed:
            return
        self._connections[conn.fileno] = conn
        self._selector.register(conn.fileno, _READ, conn)

    def watch_write(self, conn: Connection) -> None:
        if conn.closed or conn.fileno not in self._connections:
            return
        if conn._flush():
            return
        self._selector.modify(conn.fileno, _READ | _WRITE, conn)

    def _run_once(self, limit: float | None) -> None:
        """One pass: wait (at most `limit` seconds) for sockets, then run calls and timers."""
        calls = self._calls
        timers = self._timers
        if calls:
            timeout = 0.0
        elif timers:
            timeout = max(0.0, timers[0][0] - time.monotonic())
            if limit is not None and limit < timeout:
                timeout = limit
        else:
            timeout = limit
        for key, events in self._selector.select(timeout):
            target = key.data
            if target is None:
                # Drain first, then clear: a caller that saw the flag set is then sure its
                # call is seen by this pass over `calls`.
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
                self._woken = False
            elif isinstance(target, Connection):
                if events & _WRITE and target._flush() and not target.closed:
                    self._selector.modify(target.fileno, _READ, target)
                if events & _READ and not target.closed:
                    target._on_readable()
            else:
                target()
        while calls:
            fn, args = calls.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("reactor call %r failed", fn)
        if timers:
            now = time.monotonic()
            while timers and timers[0][0] <= now:
                _, _, fn, args = heapq.heappop(timers)
                try:
                    fn(*args)
                except Exception:
                    log.exception("reactor timer %r failed", fn)

    def forget(self, conn: Connection) -> None:
        if self._connections.get(conn.fileno) is conn:
            del self._connections[conn.fileno]
            try:
                self._selector.unregister(conn.fileno)
            except (KeyError, ValueError, OSError):
                pass

    def _run(self) -> None:
        with self._role:
            self._leader = threading.get_ident()
        while not self._stopping:
            if self._borrower is not None:
                self._lend()
                continue
            self._run_once(None)
        with self._role:
            self._closed = True
            self._woken = True  # from now on `_wake` writes nothing: the pipe is closed below
            pending = list(self._calls)
            self._calls.clear()
        for fn, args in pending:  # sockets handed over but never registered
            if fn == self._register:
                args[0].on_close = None
                self._connections[args[0].fileno] = args[0]
            elif fn == self._add_listener:
                args[0].close()
        for conn in list(self._connections.values()):
            conn.on_close = None
            conn.close()
        self._connections.clear()
        for sock, _ in self._listeners.values():
            sock.close()
        self._listeners.clear()
        self._admissions.clear()
        self._timers.clear()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
