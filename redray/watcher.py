"""Following published state changes: one Redis pub/sub subscription on its own thread.

Callers learn that an actor died, a placement group was placed or a process died without
polling: state changes are published on channels, and a watcher (pattern-)subscribes to the
channels it is given and hands each message to its handler.

When Redis cannot be reached the watcher says so once (a warning), subscribes again with
backoff until it can, and says so once more when it is back. Messages published meanwhile
are lost: pub/sub is a hint, the tables in Redis are the truth.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

RETRY_FIRST_SECONDS = 0.1
RETRY_MAX_SECONDS = 2.0
POLL_SECONDS = 1.0  # how long one read waits for a message (and for `stop` to be seen)


def is_connection_error(exc: BaseException) -> bool:
    """True for a lost or refused connection or a timeout (of Redis or a socket): errors
    that say a server is unreachable, not that a request was wrong."""
    return any(cls.__name__ in ("ConnectionError", "TimeoutError") for cls in type(exc).__mro__)


class Watcher:
    """A daemon thread delivering published state changes to handlers, by channel pattern."""

    def __init__(self, gcs: Any, handlers: dict[str, Callable[[dict], None]], stopping: Callable):
        self._gcs = gcs
        self._handlers = {gcs.channel(pattern): handler for pattern, handler in handlers.items()}
        self._stopping = stopping
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def ensure_running(self, timeout: float = 10.0) -> None:
        """Start the subscription if needed; return once it is confirmed (or stopped)."""
        self.start()
        if not self._stop.is_set():
            self._ready.wait(timeout)

    def start(self) -> None:
        """Start the subscription if needed (without waiting for it)."""
        if self._thread is None:
            with self._lock:
                if self._thread is None and not self._stop.is_set():
                    self._thread = threading.Thread(
                        target=self._run, daemon=True, name="redray-watch"
                    )
                    self._thread.start()

    def stop(self) -> None:
        """End the thread (within POLL_SECONDS; without waiting for it) and never start it."""
        with self._lock:
            self._stop.set()

    def join(self, timeout: float) -> None:
        """Wait (up to timeout) for the thread to end after `stop`."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _done(self) -> bool:
        return self._stop.is_set() or self._stopping()

    def _subscribe(self) -> Any:
        pubsub = self._gcs.redis.pubsub()
        try:
            pubsub.psubscribe(*self._handlers)
        except BaseException:
            pubsub.close()
            raise
        return pubsub

    def _run(self) -> None:
        pubsub = None
        confirmed = 0
        lost = False
        retry = RETRY_FIRST_SECONDS
        try:
            while not self._done():
                try:
                    if pubsub is None:
                        pubsub = self._subscribe()
                        confirmed = 0
                    message = pubsub.get_message(timeout=POLL_SECONDS)
                except Exception as exc:
                    if self._done():
                        return
                    if not lost:
                        lost = True
                        log.warning(
                            "Lost the connection to Redis (%s: %s); state changes of actors "
                            "and placement groups are not seen until it is back. Retrying.",
                            type(exc).__name__,
                            exc,
                        )
                    if pubsub is not None:
                        _close_quietly(pubsub)
                        pubsub = None
                    self._stop.wait(retry)
                    retry = min(retry * 2, RETRY_MAX_SECONDS)
                    continue
                if message is None:
                    continue
                kind = message["type"]
                if kind == "psubscribe":
                    confirmed += 1
                    if confirmed >= len(self._handlers):
                        self._ready.set()
                        retry = RETRY_FIRST_SECONDS
                        if lost:
                            lost = False
                            log.warning("The connection to Redis is back.")
                    continue
                if kind == "pmessage":
                    self._deliver(message)
        finally:
            if pubsub is not None:
                _close_quietly(pubsub)

    def _deliver(self, message: dict) -> None:
        pattern = message["pattern"]
        handler = self._handlers.get(pattern.decode() if isinstance(pattern, bytes) else pattern)
        if handler is None:
            return
        try:
            handler(json.loads(message["data"]))
        except Exception:
            log.exception("state handler failed")


def _close_quietly(pubsub: Any) -> None:
    try:
        pubsub.close()
    except Exception:
        pass
