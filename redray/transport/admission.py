"""Who may wait for a handshake, and for how long: the unauthenticated connections of one
listener.

Anyone who can reach a listener can open connections without the cluster token. Each one
costs the listening process a file descriptor until it is closed, so a listener keeps at most
`MAX_UNAUTHENTICATED` of them and gives each `protocol.HANDSHAKE_TIMEOUT` seconds to prove it
holds the token; then it is closed. When the table is full, a new connection evicts the
*oldest* waiting one rather than being refused: refusing newcomers would let a flood that
keeps the table full lock every real peer out, while with eviction a newcomer keeps its slot
until `MAX_UNAUTHENTICATED` later connections arrive, far longer than a real peer takes to
answer (one round trip). Either way the descriptors a flood can hold stay bounded.

Threading: an `Admission` belongs to the reactor thread of its listener.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from redray.transport import protocol
from redray.transport.loglimit import LimitedLog

MAX_UNAUTHENTICATED = 256

log = logging.getLogger(__name__)
_limited = LimitedLog(log)


class Pending(Protocol):
    """What admission needs of a connection waiting for its handshake."""

    def close(self) -> None: ...


class Admission:
    """The bounded, oldest-first table of one listener's unauthenticated connections."""

    def __init__(
        self,
        name: str,
        call_at: Callable[[float, Callable[[], None]], None],
        limit: int | None = None,
        deadline: float | None = None,
    ):
        """limit and deadline default to MAX_UNAUTHENTICATED and protocol.HANDSHAKE_TIMEOUT
        (as they are when the listener is made)."""
        self.name = name  # the listener, for the log
        self._call_at = call_at  # schedules a call on the reactor thread at a monotonic time
        self._limit = MAX_UNAUTHENTICATED if limit is None else limit
        self._deadline = protocol.HANDSHAKE_TIMEOUT if deadline is None else deadline
        self._waiting: dict[Pending, float] = {}  # in arrival order: -> when it is dropped
        self._armed = False  # an expiry call is scheduled

    def __len__(self) -> int:
        return len(self._waiting)

    def admit(self, conn: Pending) -> None:
        """Start conn's handshake clock; evict the oldest waiting connection if full."""
        while len(self._waiting) >= self._limit:
            oldest = next(iter(self._waiting))
            _limited.warning(
                "evict",
                "%s: more than %d connections without the cluster token; closed the oldest "
                "(a flood of connections?)",
                self.name,
                self._limit,
            )
            self.settled(oldest)
            oldest.close()
        expires = time.monotonic() + self._deadline
        self._waiting[conn] = expires
        if not self._armed:
            self._armed = True
            self._call_at(expires, self._expire)

    def settled(self, conn: Pending) -> None:
        """conn proved the token, or is closed: it no longer waits."""
        self._waiting.pop(conn, None)

    def _expire(self) -> None:
        """Close the connections whose time is up; come back for the next one."""
        self._armed = False
        now = time.monotonic()
        expired = 0
        while self._waiting:
            conn, expires = next(iter(self._waiting.items()))
            if expires > now:
                self._armed = True
                self._call_at(expires, self._expire)
                break
            del self._waiting[conn]
            conn.close()
            expired += 1
        if expired:
            _limited.warning(
                "deadline",
                "%s: closed %d connection(s) that did not prove the cluster token within %g s",
                self.name,
                expired,
                self._deadline,
            )

    def close_all(self) -> None:
        """Close every waiting connection (the listener is going away)."""
        waiting, self._waiting = self._waiting, {}
        for conn in waiting:
            conn.close()
