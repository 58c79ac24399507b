"""Who a core worker talks to, and how: message routing, requests with replies, and one
connection per peer process (other core workers, this node's raylet, other nodes' raylets).

Every message arrives on the reactor thread and goes to the handler registered for its kind
(`handle`). A request (`call_async`, `call`) carries an id its reply echoes; a connection
that closes answers its open requests with CONNECTION_LOST. Between two core workers every
message travels on the first connection made between them (`route_to`), so what one sends
the other arrives in the order it was sent.

Thread ownership: `_peers`/`_connecting`/`_raylets` are guarded by `_lock`; `_calls` is
written by callers and read on the reactor thread (single dict operations, atomic).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any

from redray import exceptions
from redray.gcs import Gcs
from redray.transport.connection import Connection
from redray.transport.reactor import Reactor, ReactorStoppedError

log = logging.getLogger(__name__)

Address = tuple  # (host, port, worker_id) of a core worker's listener
Handler = Callable[[Connection, tuple], None]

CONNECTION_LOST = ConnectionError("connection lost")
SHUTDOWN_REASON = "redray.shutdown() was called while this call was waiting"


class Peers:
    """Message routing and connections of one core worker."""

    def __init__(self, reactor: Reactor, address: Address, gcs: Gcs):
        self.reactor = reactor
        self.gcs = gcs
        self.address = address
        self.shutting_down = False
        self._handlers: dict[str, Handler] = {"reply": self._on_reply, "hello": self._on_hello}
        self._closed_listeners: list[Callable[[Connection], None]] = []
        self._calls: dict[int, Callable[[Any], None]] = {}
        self._call_ids = itertools.count(1)
        self._lock = threading.Lock()
        self._peers: dict[bytes, Connection] = {}  # worker id -> its route
        self._connecting: dict[bytes, list[Callable]] = {}
        self._raylets: dict[str, Connection] = {}  # node id -> that node's raylet

    # -- routing ----------------------------------------------------------------------------
    def handle(self, kind: str, handler: Handler) -> None:
        """Route incoming messages of `kind` to handler (on the reactor thread)."""
        self._handlers[kind] = handler

    def on_closed(self, listener: Callable[[Connection], None]) -> None:
        """listener(conn) runs (on the reactor thread) when any connection closes."""
        self._closed_listeners.append(listener)

    def on_message(self, conn: Connection, message: tuple) -> None:
        handler = self._handlers.get(message[0])
        if handler is None:
            log.warning("unknown message %r from %r", message[0], conn)
            return
        handler(conn, message)

    def on_conn_closed(self, conn: Connection) -> None:
        """A connection closed: its open requests get CONNECTION_LOST, then the listeners run."""
        for call_id in conn.info.get("calls", ()):
            callback = self._calls.pop(call_id, None)
            if callback is not None:
                try:
                    callback(CONNECTION_LOST)
                except Exception:
                    log.exception("callback failed on connection loss")
        peer = conn.info.get("peer_id")
        with self._lock:
            if peer is not None and self._peers.get(peer) is conn:
                del self._peers[peer]
            node = next((n for n, c in self._raylets.items() if c is conn), None)
            if node is not None:
                del self._raylets[node]
        for listener in self._closed_listeners:
            try:
                listener(conn)
            except Exception:
                log.exception("connection-closed listener %r failed", listener)

    def connect(self, address: tuple[str, int], on_close: Callable | None = None) -> Connection:
        """An authenticated connection to address whose messages come here (blocking)."""
        return self.reactor.connect(address, self.on_message, on_close or self.on_conn_closed)

    # -- requests ---------------------------------------------------------------------------
    def call_async(self, conn: Connection, kind: str, args: tuple, callback: Callable) -> None:
        """Send a request; callback(reply) runs on the reactor thread (CONNECTION_LOST on loss).

        Never calls back before returning (the caller may hold locks, or loop until its
        request is answered), except once the reactor is stopped: nothing else would."""
        call_id = next(self._call_ids)
        self._calls[call_id] = callback
        conn.info.setdefault("calls", set()).add(call_id)
        if not conn.send((kind, call_id, *args)):
            conn.info["calls"].discard(call_id)
            self._calls.pop(call_id, None)
            if self.reactor.stopped:
                callback(CONNECTION_LOST)
            else:
                self.reactor.call_soon(callback, CONNECTION_LOST)

    def call(self, conn: Connection, kind: str, *args: Any, timeout: float | None = None) -> Any:
        """Send a request and wait for its reply; CONNECTION_LOST if the peer went away.

        Not on the thread running the reactor loop (LoopBlockedError: see Reactor.block);
        GetTimeoutError after timeout; ReactorStoppedError once redray is shut down."""
        waiter = self.reactor.waiter()
        result: list[Any] = []

        def on_reply(reply: Any) -> None:
            result.append(reply)
            waiter.set()

        self.call_async(conn, kind, args, on_reply)
        if not self.reactor.block(waiter, timeout, spin=True):
            raise exceptions.GetTimeoutError(f"no reply to {kind} within {timeout} s")
        reply = result[0]
        if reply is CONNECTION_LOST and self.shutting_down:
            raise ReactorStoppedError(SHUTDOWN_REASON)
        return reply

    def _on_reply(self, conn: Connection, message: tuple) -> None:
        _, call_id, reply = message
        conn.info.get("calls", set()).discard(call_id)
        callback = self._calls.pop(call_id, None)
        if callback is not None:
            callback(reply)

    # -- other core workers -----------------------------------------------------------------
    def _on_hello(self, conn: Connection, message: tuple) -> None:
        address = message[1]
        conn.info.update(peer=address, peer_id=address[2])
        with self._lock:
            self._peers.setdefault(address[2], conn)

    def route_to(self, conn: Connection) -> Connection:
        """The connection everything we send to conn's peer travels on (the first one made
        between us): a reply sent there is never overtaken by what we send the peer after
        it, such as the release of a ref the reply carries."""
        route = self._peers.get(conn.info.get("peer_id"))
        return route if route is not None and not route.closed else conn

    def peer(self, address: Address) -> Connection:
        """A connection to another core worker (made once, then reused; blocking)."""
        with self._lock:
            conn = self._peers.get(address[2])
        if conn is not None and not conn.closed:
            return conn
        conn = self.connect(address[:2])
        conn.info.update(peer=address, peer_id=address[2])
        conn.send(("hello", self.address))
        with self._lock:
            current = self._peers.get(address[2])
            if current is not None and not current.closed:
                # Both sides connected at once. Keep ours open (the peer may already use
                # it) but route everything through the first one, so order is kept.
                return current
            self._peers[address[2]] = conn
        return conn

    def peer_async(self, address: Address, then: Callable[[Connection | None], None]) -> None:
        """Like `peer`, without blocking the calling thread on a new connection: then(conn,
        or None if the peer cannot be reached).

        Callbacks for one peer run in the order they were requested, so messages sent from
        them keep their order even while the connection is still being made.
        """
        peer_id = address[2]
        with self._lock:
            waiting = self._connecting.get(peer_id)
            if waiting is not None:
                waiting.append(then)
                return
            conn = self._peers.get(peer_id)
            if conn is None or conn.closed:
                self._connecting[peer_id] = [then]
        if conn is not None and not conn.closed:
            then(conn)
            return

        def connect() -> None:
            try:
                result = self.peer(address)
            except OSError:
                result = None
            while True:
                with self._lock:
                    callbacks = self._connecting[peer_id]
                    if not callbacks:
                        del self._connecting[peer_id]
                        return
                    self._connecting[peer_id] = []
                for callback in callbacks:
                    try:
                        callback(result)
                    except Exception:
                        log.exception("peer callback failed")

        threading.Thread(target=connect, daemon=True, name="redray-connect").start()

    def send_to(self, address: Address, message: tuple) -> None:
        """Send a message to another core worker (dropped if it cannot be reached)."""

        def send(conn: Connection | None) -> None:
            if conn is not None:
                conn.send(message)

        self.peer_async(address, send)

    # -- raylets of other nodes -------------------------------------------------------------
    def connect_raylet(self, node_id: str, address: Any, then: Callable) -> None:
        """then(connection to node_id's raylet, or None if unreachable) on the reactor
        thread; the connection is made once and reused."""
        conn = self._raylets.get(node_id)
        if conn is not None and not conn.closed:
            then(conn)
            return

        def connect() -> None:
            try:
                conn = self.connect(tuple(address))
                conn.send(("hello_client", self.address))
                with self._lock:
                    self._raylets[node_id] = conn
            except OSError:
                conn = None
            self.reactor.call_soon(then, conn)

        threading.Thread(target=connect, daemon=True, name="redray-connect").start()

    def raylet_of(self, conn: Connection) -> str | None:
        """The node whose raylet is at the other end of conn (None: not a known raylet)."""
        return next((n for n, c in self._raylets.items() if c is conn), None)

    def send_to_raylet(self, node_id: str, message: tuple) -> None:
        """Send a message to a live node's raylet (a GCS read: not on the reactor thread)."""
        info = self.gcs.node(node_id)
        if info is None or info.get("state") != "ALIVE":
            return
        self.connect_raylet(
            node_id, info["raylet_address"], lambda c: c.send(message) if c else None
        )
