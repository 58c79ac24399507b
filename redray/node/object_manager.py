"""Moving objects between nodes: each raylet serves its store and pulls what its readers need.

A pull is one authenticated TCP connection per object: a small request frame, a header with
the size, then the raw bytes streamed from the serving node's store straight into the
pulling node's store (`sendall` from one mapping, `recv_into` the other), with no copy
through Python objects. Several pulls run at once, each on its own thread; readers waiting
for the same object share one pull, and every one of them is answered however the pull ends
(an error, a peer that stalls or vanishes, the object freed meanwhile). Socket operations
are bounded by `TRANSFER_TIMEOUT`, so a stalled peer cannot hold a pull or a pin forever.

Threading: the store belongs to the raylet's reactor thread. Transfer threads only touch it
through `_on_reactor` / ``reactor.call_soon``; `_pulls` is touched on the reactor thread only.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from redray import exceptions
from redray.objstore import files
from redray.objstore.arena import SharedArena
from redray.objstore.store import ObjectStore
from redray.transport import protocol
from redray.transport.reactor import Reactor

log = logging.getLogger("redray.node.object_manager")

CHUNK = 8 << 20
TRANSFER_TIMEOUT = 30.0  # per socket operation: a peer silent this long is given up on
REACTOR_TIMEOUT = 60.0


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
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(128)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._pulls: dict[bytes, list[Callable[[BaseException | None], None]]] = {}
        threading.Thread(target=self._accept, daemon=True, name="object-server").start()

    def close(self) -> None:
        try:
            self._listener.close()
        except OSError:
            pass

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
    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        store = self._store
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            protocol.server_handshake(sock, self.token)
            sock.settimeout(TRANSFER_TIMEOUT)
            request = protocol.recv_frame(sock)
            if not (isinstance(request, tuple) and request[0] == "fetch"):
                return
            oid = request[1]
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
        except Exception as exc:  # a peer that vanished, stalled, or spoke nonsense
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
            threading.Thread(
                target=self._pull, args=(oid, tuple(address), owner), daemon=True, name="pull"
            ).start()
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
                header = protocol.recv_frame(sock)
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
