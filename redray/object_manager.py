"""Moving objects between nodes: each raylet serves its store and pulls what its readers need.

A pull is one authenticated TCP connection per object: a small request frame, a header with
the size, then the raw bytes streamed from the serving node's shared memory straight into
the pulling node's shared memory (`sendall` from one mapping, `recv_into` the other), with
no copy through Python objects. Several pulls run at once, each on its own thread; readers
waiting for the same object share one pull.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redray import exceptions, protocol

if TYPE_CHECKING:
    from redray.raylet import Raylet

log = logging.getLogger("redray.object_manager")

CHUNK = 8 << 20


class ObjectManager:
    """Serves local objects to other nodes and pulls remote ones into the local store."""

    def __init__(self, raylet: Raylet):
        self.raylet = raylet
        self.token = raylet.token
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((raylet.host, 0))
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

        self.raylet.reactor.call_soon(run)
        if not done.wait(60):
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
        store = self.raylet.store
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            protocol.server_handshake(sock, self.token)
            request = protocol.recv_frame(sock)
            if not (isinstance(request, tuple) and request[0] == "fetch"):
                return
            oid = request[1]
            location = self._on_reactor(lambda: store.get(oid))
            if location is None:
                protocol.send_frame(sock, ("missing",))
                return
            offset, size = location
            try:
                protocol.send_frame(sock, ("ok", size))
                view = self.raylet.arena.view
                for start in range(offset, offset + size, CHUNK):
                    sock.sendall(view[start : min(start + CHUNK, offset + size)])
            finally:
                self.raylet.reactor.call_soon(self.raylet.release_pin, oid)
        except (OSError, EOFError, protocol.AuthenticationError) as exc:
            log.debug("object transfer to a peer ended: %s", exc)
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
        """Copy oid from the node serving at address into the local store (reactor thread)."""
        waiting = self._pulls.get(oid)
        if waiting is not None:
            waiting.append(then)
            return
        self._pulls[oid] = [then]
        if address is None:
            self._finish(oid, exceptions.ObjectLostError(oid.hex()))
            return
        threading.Thread(
            target=self._pull, args=(oid, tuple(address), owner), daemon=True, name="pull"
        ).start()

    def _pull(self, oid: bytes, address: tuple[str, int], owner: bytes) -> None:
        store = self.raylet.store
        error: BaseException | None = None
        created = False
        try:
            with protocol.connect(address, self.token, local=False) as sock:
                protocol.send_frame(sock, ("fetch", oid))
                header = protocol.recv_frame(sock)
                if header[0] != "ok":
                    raise exceptions.ObjectLostError(oid.hex())
                size = header[1]
                offset = self._on_reactor(lambda: store.create(oid, size, owner))
                created = True
                view = self.raylet.arena.view[offset : offset + size]
                received = 0
                while received < size:
                    n = sock.recv_into(view[received : min(received + CHUNK, size)])
                    if n == 0:
                        raise ConnectionError("the serving node closed the transfer")
                    received += n
                self._on_reactor(lambda: store.seal(oid))
        except exceptions.ObjectStoreFullError as exc:
            error = exc
        except (OSError, EOFError, ValueError, exceptions.RayError) as exc:
            if created:
                self.raylet.reactor.call_soon(store.abort, oid)
            error = (
                exc
                if isinstance(exc, exceptions.ObjectLostError)
                else exceptions.ObjectLostError(oid.hex())
            )
        self.raylet.reactor.call_soon(self._finish, oid, error)

    def _finish(self, oid: bytes, error: BaseException | None) -> None:
        for then in self._pulls.pop(oid, []):
            try:
                then(error)
            except Exception:
                log.exception("pull callback failed")
