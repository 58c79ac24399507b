"""Following published state changes: one Redis pub/sub subscription on its own thread.

Callers learn that an actor died, a placement group was placed or a process died without
polling: state changes are published on channels, and a watcher (pattern-)subscribes to the
channels it is given and hands each message to its handler.

When the subscription is lost (Redis restarted, failed over, hung or unreachable) the
watcher tells the process's Redis health (one warning per outage, not one per retry) and
subscribes again with backoff until it can. Messages published meanwhile are lost: pub/sub is
a hint, the tables in Redis are the truth. So once subscribed again (also when redis-py
re-made the connection by itself, which shows as a second round of subscribe confirmations)
it calls its ``resync`` callback, with which the caller re-reads the tables it mirrors.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from redray.exceptions import GcsUnavailableError
from redray.outage import health

log = logging.getLogger(__name__)

RETRY_FIRST_SECONDS = 0.1
RETRY_MAX_SECONDS = 2.0
POLL_SECONDS = 1.0  # how long one read waits for a message (and for `stop` to be seen)


def is_connection_error(exc: BaseException) -> bool:
    """True for a lost or refused connection or a timeout (of Redis or a socket), or Redis
    unreachable for longer than the outage limit: errors that say a server is unreachable,
    not that a request was wrong."""
    if isinstance(exc, GcsUnavailableError):
        return True
    return any(cls.__name__ in ("ConnectionError", "TimeoutError") for cls in type(exc).__mro__)


class Watcher:
    """A daemon thread delivering published state changes to handlers, by channel pattern."""

    def __init__(
        self,
        gcs: Any,
        handlers: dict[str, Callable[[dict], None]],
        stopping: Callable[[], bool],
        resync: Callable[[], None] | None = None,
    ):
        """handlers: channel pattern (relative to the cluster) -> handler of its messages;
        stopping() says when to end; resync() is called (on the watcher thread, so it must
        not block for long) each time the subscription is made again after it was lost."""
        self._gcs = gcs
        self._patterns = list(handlers)
        self._handlers = {gcs.channel(pattern): handler for pattern, handler in handlers.items()}
        self._stopping = stopping
        self._resync = resync
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

    def _run(self) -> None:
        subscription = None
        confirmed = 0  # subscribe confirmations on the current subscription
        lost = False  # the subscription was lost since the tables were last re-read
        retry = RETRY_FIRST_SECONDS
        wanted = len(self._handlers)
        try:
            while not self._done():
                try:
                    if subscription is None:
                        subscription = self._gcs.subscription(patterns=self._patterns)
                        confirmed = 0
                    message = subscription.get_message(POLL_SECONDS)
                except Exception as exc:
                    if self._done():
                        return
                    if is_connection_error(exc):
                        health.lost(exc)
                    else:
                        log.warning("the state subscription failed (%r); subscribing again", exc)
                    subscription = None  # (closed by the error)
                    lost = True
                    self._stop.wait(retry)
                    retry = min(retry * 2, RETRY_MAX_SECONDS)
                    continue
                if message is None:
                    continue
                kind = message["type"]
                if kind == "psubscribe":
                    confirmed += 1
                    if confirmed % wanted:
                        continue
                    retry = RETRY_FIRST_SECONDS
                    if confirmed > wanted:
                        lost = True  # redis-py re-made the connection and subscribed again
                    self._ready.set()
                    if lost:
                        lost = False
                        health.back()
                        self._call_resync()
                    continue
                if kind == "pmessage":
                    self._deliver(message)
        finally:
            if subscription is not None:
                subscription.close()

    def _call_resync(self) -> None:
        if self._resync is None:
            return
        try:
            self._resync()
        except Exception:
            log.exception("re-reading the mirrored state failed")

    def _deliver(self, message: dict) -> None:
        pattern = message["pattern"]
        handler = self._handlers.get(pattern.decode() if isinstance(pattern, bytes) else pattern)
        if handler is None:
            return
        try:
            handler(json.loads(message["data"]))
        except Exception:
            log.exception("state handler failed")
