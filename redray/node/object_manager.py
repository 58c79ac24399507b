"""Moving objects between nodes: each raylet serves its store and pulls what its readers need.

A pull is one authenticated TCP connection per object: a small request frame, a header with
the size, then the raw bytes streamed from the serving node's store straight into the
pulling node's store (`sendall` from one mapping, `recv_into` the other), with no copy
through Python objects. Readers waiting for the same object share one pull, and every one of
them is answered however the pull ends (an error, a peer that stalls or vanishes, the object
freed meanwhile). Socket operations are bounded by `TRANSFER_TIMEOUT`, so a stalled peer
cannot hold a pull or a pin forever.

The listener is the raylet reactor's, like every other redray listener: connections are
accepted, authenticated and given their handshake deadline there, with the same bound on
those waiting for it (redray/transport/admission.py), and a peer's request frame is read
there too. Only then is the socket handed to a transfer thread. Transfers run on at most
`SERVE_THREADS` threads and pulls on at most `PULL_THREADS`; more wait for a free one, so
however many peers connect, the thread count stays bounded.

Threading: the store belongs to the raylet's reactor thread. Transfer threads only touch it
through `_on_reactor` / ``reactor.call_soon``; `_pulls` is touched on the reactor thread only.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from collections.abc import Callable
from typing import Any

from redray import exceptions
from redray.objstore import files
from redray.objstore.arena import SharedArena
from redray.objstore.store import ObjectStore
from redray.transport import protocol
from redray.transport.connection import Connection
from redray.transport.reactor import Reactor

log = logging.getLogger("redray.node.object_manager")

CHUNK = 8 << 20
TRANSFER_TIMEOUT = 30.0  # per socket operation: a peer silent this long is given up on
REACTOR_TIMEOUT = 60.0
SERVE_THREADS = 16  # objects sent to other nodes at once
PULL_THREADS = 16  # objects pulled from other nodes at once


class _Threads:
    """Up to `size` daemon threads running submitted calls in order, started as needed."""

    def __init__(self, size: int, name: str):
        self._size = size
        self._name = name
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._started = 0
        self._idle = 0  # threads waiting for a call, minus calls submitted to them

    def submit(self, fn: Callable, *args: Any) -> None:
        """Run fn(*args) on one of the threads; RuntimeError if there is none to be had."""
        with self._lock:
            start = self._idle <= 0 and self._started < self._size
            if start:
                self._started += 1
            else:
                self._idle -= 1
        if start:
            try:
                threading.Thread(target=self._run, daemon=True, name=self._name).start()
            except RuntimeError:  # no new thread: queue it for a running one, if any
                with self._lock:
                    self._started -= 1
                    if not self._started:
                        raise
                    self._idle -= 1
        self._calls.put((fn, args))

    def _run(self) -> None:
        while True:
            fn, args = self._calls.get()
            try:
                fn(*args)
            except Exception:
                log.exception("%s failed", self._name)
            with self._lock:
                self._idle += 1


class ObjectManager:
    """Serves local objects to other nodes and pulls remote ones into the local store."""

    def __init__(
        self,
        token: bytes,
        host: str,
        reactor: Reactor,
        store: ObjectStore,
        arena: SharedArena,
        release_pin: Callable[[bytes], None],
        when_sealed: Callable[[bytes, Callable[[bool], None]], None],
    ):
        self.token = token
        self._reactor = reactor  # the store's owning thread runs its loop
        self._store = store
        self._arena = arena
        self._release_pin = release_pin  # undo a pin taken for a transfer (reactor thread)
        self._when_sealed = when_sealed  # (reactor thread) wait for an object being written
        self._serving = _Threads(SERVE_THREADS, "object-server")
        self._pulling = _Threads(PULL_THREADS, "pull")
        # TCP only: pulls come from other nodes (or other network namespaces).
        self.address: tuple[str, int] = reactor.listen(host, 0, self._on_request, local=False)
        self._pulls: dict[bytes, list[Callable[[BaseException | None], None]]] = {}

    def close(self) -> None:
        self._reactor.stop_listening(self.address)

    # -- helpers ----------------------------------------------------------------------------
    def _on_reactor(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the raylet's reactor thread (the store's only user) and return its result."""
        done = threading.Event()
        box: list[Any] = []

        def run() -> None:
            try:
                box.append((True, fn()))
            except BaseException as exc:  # handed back to the waiting thread
                box.append((False, exc))
            done.set()

        self._reactor.call_soon(run)
        if not done.wait(REACTOR_TIMEOUT):
            raise TimeoutError("the raylet did not answer")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    # -- serving ----------------------------------------------------------------------------
    def _on_request(self, conn: Connection, request: Any) -> None:
        """(reactor thread) An authenticated peer asks for an object: hand its socket to a
        transfer thread."""
        if not (
            isinstance(request, tuple)
            and len(request) == 2
            and request[0] == "fetch"
            and isinstance(request[1], bytes)
        ):
            log.warning("unexpected object manager request %.200r; closing", request)
            conn.close()
            return
        sock, unsent = conn.detach()
        try:
            self._serving.submit(self._serve, sock, unsent, request[1])
        except RuntimeError:
            sock.close()

    def _serve(self, sock: socket.socket, unsent: bytes, oid: bytes) -> None:
        store = self._store
        try:
            sock.settimeout(TRANSFER_TIMEOUT)
            if unsent:
                sock.sendall(unsent)
            sealed = threading.Event()
            self._reactor.call_soon(self._when_sealed, oid, lambda _: sealed.set())
            sealed.wait(TRANSFER_TIMEOUT)
            location = self._on_reactor(lambda: store.get(oid))
            if location is None:
                protocol.send_frame(sock, ("missing",))
                return
            where, size = location
            try:
                view = files.region(self._arena, where, size, writable=False)
                protocol.send_frame(sock, ("ok", size))
                for start in range(0, size, CHUNK):
                    sock.sendall(view[start : min(start + CHUNK, size)])
                del view
            finally:
                self._reactor.call_soon(self._release_pin, oid)
        except Exception as exc:  # a peer that vanished or stalled
            log.debug("object transfer to a peer ended: %r", exc)
        finally:
            sock.close()

    # -- pulling ----------------------------------------------------------------------------
    def pull(
        self,
        oid: bytes,
        address: tuple[str, int] | None,
        owner: bytes,
        then: Callable[[BaseException | None], None],
    ) -> None:
        """Copy oid from the node serving at address into the local store (reactor thread).

        `then(error)` is called on the reactor thread once the pull ends, with None if the
        object is now in the local store; readers asking while a pull runs share it.
        """
        waiting = self._pulls.get(oid)
        if waiting is not None:
            waiting.append(then)
            return
        self._pulls[oid] = [then]
        if address is None:
            self._finish(oid, exceptions.ObjectLostError(oid.hex()))
            return
        try:
            self._pulling.submit(self._pull, oid, tuple(address), owner)
        except RuntimeError as exc:  # no thread for it: the readers hear so now
            self._finish(oid, exceptions.ObjectLostError(f"{oid.hex()}: {exc}"))

    def _pull(self, oid: bytes, address: tuple[str, int], owner: bytes) -> None:
        """The pull's thread: transfer, then answer the waiters whatever happened."""
        error: BaseException | None = exceptions.ObjectLostError(oid.hex())
        try:
            error = self._transfer(oid, address, owner)
        except Exception as exc:
            log.debug("pull of %s from %s failed: %r", oid.hex(), address, exc)
        finally:
            self._reactor.call_soon(self._finish, oid, error)

    def _transfer(self, oid: bytes, address: tuple[str, int], owner: bytes) -> BaseException | None:
        """Copy the object in; returns the error the waiting readers get (None: it is here)."""
        store = self._store
        created: list[Any] = []  # appended on the reactor thread once the region exists
        sealed = False

        def create() -> Any:
            location = store.create(oid, size, owner)
            created.append(location)
            return location

        try:
            with protocol.connect(address, self.token, TRANSFER_TIMEOUT, local=False) as sock:
                sock.settimeout(TRANSFER_TIMEOUT)
                protocol.send_frame(sock, ("fetch", oid))
                header = protocol.recv_frame(sock, address)
                if not (isinstance(header, tuple) and header and header[0] == "ok"):
                    return exceptions.ObjectLostError(oid.hex())
                size = int(header[1])
                view = files.region(self._arena, self._on_reactor(create), size, writable=True)
                received = 0
                while received < size:
                    n = sock.recv_into(view[received : min(received + CHUNK, size)])
                    if n == 0:
                        raise ConnectionError("the serving node closed the transfer")
                    received += n
                del view
            sealed = self._on_reactor(lambda: store.seal(oid))
            # Not sealed: freed while it was copied (its owner died or dropped it).
            return None if sealed else exceptions.ObjectLostError(oid.hex())
        except exceptions.ObjectStoreFullError as exc:
            return exc
        finally:
            if not sealed:  # queued after create: it sees whether a region was made
                self._reactor.call_soon(self._abort_created, oid, created)

    def _abort_created(self, oid: bytes, created: list[Any]) -> None:
        """Drop the unsealed region of a pull that did not seal it (reactor thread)."""
        if not created:
            return
        try:
            self._store.abort(oid)
        except ValueError:
            pass  # sealed after all: the object is complete

    def _finish(self, oid: bytes, error: BaseException | None) -> None:
        for then in self._pulls.pop(oid, []):
            try:
                then(error)
            except Exception:
                log.exception("pull callback failed")
