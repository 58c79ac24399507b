"""Following published state changes: one Redis pub/sub subscription on its own thread.

Callers learn that an actor died, a placement group was placed or a process died without
polling: state changes are published on channels, and a watcher (pattern-)subscribes to the
channels it is given and hands each message to its handler, resubscribing after errors.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class Watcher:
    """A daemon thread delivering published state changes to handlers, by channel pattern."""

    def __init__(self, gcs: Any, handlers: dict[str, Callable[[dict], None]], stopping: Callable):
        self._gcs = gcs
        self._handlers = {gcs.channel(pattern): handler for pattern, handler in handlers.items()}
        self._stopping = stopping
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def ensure_running(self, timeout: float = 10.0) -> None:
        """Start the subscription if needed; return once it is confirmed."""
        self.start()
        self._ready.wait(timeout)

    def start(self) -> None:
        """Start the subscription if needed (without waiting for it)."""
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, daemon=True, name="redray-watch"
                    )
                    self._thread.start()

    def _subscribe(self) -> Any:
        pubsub = self._gcs.redis.pubsub()
        pubsub.psubscribe(*self._handlers)
        return pubsub

    def _run(self) -> None:
        pubsub = self._subscribe()
        confirmed = 0
        while not self._stopping():
            try:
                message = pubsub.get_message(timeout=1.0)
            except Exception:
                if self._stopping():
                    return
                log.exception("state subscription failed; subscribing again")
                pubsub = self._subscribe()
                continue
            if message is None:
                continue
            if message["type"] == "psubscribe":
                confirmed += 1
                if confirmed >= len(self._handlers):
                    self._ready.set()
                continue
            if message["type"] != "pmessage":
                continue
            pattern = message["pattern"]
            handler = self._handlers.get(
                pattern.decode() if isinstance(pattern, bytes) else pattern
            )
            if handler is not None:
                try:
                    handler(json.loads(message["data"]))
                except Exception:
                    log.exception("state handler failed")
        pubsub.close()
