"""A framed, authenticated socket: what every redray process talks over.

Senders write straight to the socket from whatever thread they are on (the common case costs
one syscall and no thread hand-off); only what the kernel would not take is queued for the
reactor (redray/reactor.py) to flush. Incoming frames are decoded on the thread running the
reactor loop and handed to the connection's handler there, in order, so handlers must not
block. A listener's side reads nothing but the handshake until the peer proved it holds the
cluster token (redray/protocol.py), within the time its listener's admission allows
(redray/transport/admission.py).
"""

from __future__ import annotations

import logging
import pickle
import socket
import threading
from collections.abc import Callable
from typing import Any, Protocol

from redray.transport import protocol
from redray.transport.loglimit import LimitedLog

log = logging.getLogger(__name__)
_limited = LimitedLog(log)

Handler = Callable[["Connection", Any], None]


class Loop(Protocol):
    """What a connection needs of the I/O loop it is registered with (a `Reactor`)."""

    token: bytes  # the cluster token a listener's peers must prove they hold
    scratch: memoryview  # where reads land first (one buffer for every connection)

    def call_soon(self, fn: Callable, *args: Any) -> None: ...
    def in_reactor(self) -> bool: ...
    def forget(self, conn: Connection) -> None: ...
    def watch_write(self, conn: Connection) -> None: ...


class Admission(Protocol):
    """Where a listener's connection waits for its handshake (admission.Admission)."""

    def settled(self, conn: Connection) -> None: ...


class Connection:
    """A framed, authenticated socket registered with a `Reactor`."""

    def __init__(
        self,
        reactor: Loop,
        sock: socket.socket,
        handler: Handler,
        on_close: Callable[[Connection], None] | None = None,
        pending_auth: bytes | None = None,
        admission: Admission | None = None,
    ):
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reactor = reactor
        self.sock = sock
        self.fileno = sock.fileno()
        self.handler = handler
        self.on_close = on_close
        self.closed = False
        self.info: dict[str, Any] = {}
        self._out = bytearray()
        self._send_lock = threading.Lock()
        self._in = bytearray()
        self._nonce = pending_auth  # set while a server-side handshake is pending
        self._admission = admission  # (reactor thread) the listener's table, until then

    def __repr__(self) -> str:
        return f"<Connection fd={self.fileno} {self.info.get('peer', '')}>"

    def send(self, message: object) -> bool:
        """Queue one message; False when the connection is already closed."""
        return self.send_bytes(protocol.encode(message))

    def send_bytes(self, data: bytes) -> bool:
        with self._send_lock:
            if self.closed:
                return False
            if self._out:
                self._out += data
                return True
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.reactor.call_soon(self.close)
                return False
            if sent < len(data):
                self._out += memoryview(data)[sent:]
                self.reactor.call_soon(self.reactor.watch_write, self)
            return True

    def flush_blocking(self, timeout: float = 2.0) -> None:
        """Push out anything queued, waiting up to timeout (before a process exits)."""
        with self._send_lock:
            if self.closed or not self._out:
                return
            try:
                self.sock.settimeout(timeout)
                self.sock.sendall(self._out)
                self._out.clear()
            except OSError:
                pass
            finally:
                try:
                    self.sock.setblocking(False)
                except OSError:
                    pass

    def close(self) -> None:
        """Close the socket and run `on_close` once (on the reactor thread)."""
        if not self.reactor.in_reactor():
            self.reactor.call_soon(self.close)
            return
        with self._send_lock:
            if self.closed:
                return
            self.closed = True
        self.reactor.forget(self)
        if self._admission is not None:
            self._admission.settled(self)
            self._admission = None
        try:
            self.sock.close()
        except OSError:
            pass
        if self.on_close is not None:
            try:
                self.on_close(self)
            except Exception:
                log.exception("on_close handler failed for %r", self)

    # -- reactor side -------------------------------------------------------------------
    def _flush(self) -> bool:
        """Write queued bytes; True when nothing is left."""
        with self._send_lock:
            if self.closed:
                return True
            while self._out:
                try:
                    sent = self.sock.send(self._out)
                except (BlockingIOError, InterruptedError):
                    return False
                except OSError:
                    self.reactor.call_soon(self.close)
                    return True
                del self._out[:sent]
            return True

    def _on_readable(self) -> None:
        scratch = self.reactor.scratch
        try:
            received = self.sock.recv_into(scratch)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            received = 0
        if not received:
            self.close()
            return
        buf = self._in
        buf += scratch[:received]
        if self._nonce is not None and not self._finish_handshake():
            return
        offset, size = 0, len(buf)
        unpack = protocol.HEADER.unpack_from
        header = protocol.HEADER.size
        try:
            while size - offset >= header:
                (length,) = unpack(buf, offset)
                if length > protocol.MAX_FRAME:
                    _limited.warning(
                        "frame", "%s; peer %r", protocol.FrameTooLargeError(length), self
                    )
                    self.close()
                    return
                end = offset + header + length
                if end > size:
                    break
                try:
                    message = pickle.loads(memoryview(buf)[offset + header : end])
                except Exception:
                    log.exception("undecodable frame from %r; closing", self)
                    self.close()
                    return
                offset = end
                try:
                    self.handler(self, message)
                except Exception:
                    log.exception("handler failed on %r for %.200r", self, message)
                if self.closed:
                    return
        finally:
            if offset and not self.closed:
                del buf[:offset]  # each frame is handled once, even if a handler raised

    def _finish_handshake(self) -> bool:
        """Server side: check the client's proof before any frame is decoded."""
        if len(self._in) < protocol.CLIENT_PROOF_BYTES:
            return False
        proof = bytes(self._in[: protocol.CLIENT_PROOF_BYTES])
        answer = protocol.server_verify(self.reactor.token, self._nonce, proof)
        if answer is None:
            _limited.warning("token", "rejected a connection without the cluster token")
            self.send_bytes(protocol.REJECTED)
            self.close()
            return False
        del self._in[: protocol.CLIENT_PROOF_BYTES]
        self._nonce = None
        if self._admission is not None:
            self._admission.settled(self)
            self._admission = None
        self.send_bytes(answer)
        return True

    def detach(self) -> tuple[socket.socket, bytes]:
        """(reactor thread) Stop serving this connection and hand its socket over: a
        blocking socket the caller now owns, and what was queued for it but not yet sent
        (the caller sends that first). `on_close` does not run."""
        with self._send_lock:
            self.closed = True
            unsent, self._out = bytes(self._out), bytearray()
        self.reactor.forget(self)
        if self._admission is not None:
            self._admission.settled(self)
            self._admission = None
        self.sock.setblocking(True)
        return self.sock, unsent
