"""A few threads for blocking work that the thread running the reactor loop hands over.

The loop's thread must never wait for what the loop produces (see reactor.py), yet some of
what it learns must be followed by a blocking step: a future of a stored object is resolved
by reading the object, which waits for the raylet. Such steps run here. Threads start on
first need, up to a bound, and end at `stop` (which waits for them, within a bound).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class OffLoop:
    """Up to `size` threads running handed-over calls in order of arrival."""

    def __init__(self, size: int, name: str):
        self._size = size
        self._name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for a job
        self._lock = threading.Lock()
        self._stopped = False

    def submit(self, fn: Callable, *args: Any) -> bool:
        """Run fn(*args) on one of the threads; False once stopped (fn is not run)."""
        with self._lock:
            if self._stopped:
                return False
            if self._idle == 0 and len(self._threads) < self._size:
                thread = threading.Thread(target=self._run, daemon=True, name=self._name)
                self._threads.append(thread)
                thread.start()
            self._jobs.put((fn, args))
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Run what was handed over, then end the threads (waiting up to timeout)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            threads = list(self._threads)
            for _ in threads:
                self._jobs.put(None)
        deadline = time.monotonic() + timeout
        current = threading.current_thread()
        for thread in threads:
            if thread is not current:
                thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            job = self._jobs.get()
            with self._lock:
                self._idle -= 1
            if job is None:
                return
            fn, args = job
            try:
                fn(*args)
            except Exception:
                log.exception("%s: %r failed", self._name, fn)
