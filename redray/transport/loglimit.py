"""Warnings a peer can trigger at will (a flood of bad connections) are logged at most once
per interval and kind, with a count of those left out, so a flood cannot fill the log."""

from __future__ import annotations

import logging
import threading
import time

INTERVAL_SECONDS = 10.0


class LimitedLog:
    """`warning(kind, ...)` logs the first of each kind, then at most one per interval."""

    def __init__(self, logger: logging.Logger, interval: float = INTERVAL_SECONDS):
        self._log = logger
        self._interval = interval
        self._lock = threading.Lock()
        self._kinds: dict[str, tuple[float, int]] = {}  # kind -> (last logged, left out since)

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            last, left_out = self._kinds.get(kind, (-self._interval, 0))
            if now - last < self._interval:
                self._kinds[kind] = (last, left_out + 1)
                return
            self._kinds[kind] = (now, 0)
        if left_out:
            message += f" ({left_out} more like this in the last {now - last:.0f} s)"
        self._log.warning(message, *args)
