"""Riding out a Redis outage: how long a process waits for Redis to come back, and the one
warning it logs when Redis goes and the one when it is back.

The task hot path never needs Redis, so a node keeps running tasks and calls to live actors
while Redis is away. What needs Redis waits for it, up to the outage limit
(``REDRAY_REDIS_OUTAGE_SECONDS``, default 60, as Ray's ``gcs_rpc_server_reconnect_timeout_s``):
a raylet gives up and stops after that long without Redis; a driver's or worker's call that
needs Redis raises ``GcsUnavailableError`` instead.

Every thread of a process that meets the outage reports it to the process's ``health``, so
the log gets one line when Redis goes and one when it is back, not one per retry.
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger("redray")

OUTAGE_ENV = "REDRAY_REDIS_OUTAGE_SECONDS"
DEFAULT_OUTAGE_SECONDS = 60.0


def outage_limit() -> float:
    """How long (seconds) this process rides out a Redis outage, from the environment.
    ValueError for a value that is not a positive number."""
    raw = os.environ.get(OUTAGE_ENV, "")
    if raw == "":
        return DEFAULT_OUTAGE_SECONDS
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{OUTAGE_ENV} must be a number of seconds, got {raw!r}") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{OUTAGE_ENV} must be a positive number of seconds, got {raw!r}")
    return value


class RedisHealth:
    """Whether this process can reach Redis, as its threads last found; says so in the log
    once per change. Thread-safe; `down` is a plain attribute read."""

    def __init__(self) -> None:
        # What the process does meanwhile, for the warning (set by the process's main part).
        self.consequence = "Tasks and calls to live actors carry on; what needs Redis waits."
        self.down = False
        self._since = 0.0
        self._lock = threading.Lock()

    def lost(self, error: BaseException) -> bool:
        """A thread found Redis unreachable; True if this is news (the warning was logged)."""
        with self._lock:
            if self.down:
                return False
            self.down = True
            self._since = time.monotonic()
        log.warning(
            "Lost the connection to Redis (%s: %s). %s",
            type(error).__name__,
            str(error).rstrip("."),
            self.consequence,
        )
        return True

    def back(self) -> bool:
        """A thread reached Redis again; True if this is news (the line was logged)."""
        if not self.down:
            return False
        with self._lock:
            if not self.down:
                return False
            self.down = False
            lasted = time.monotonic() - self._since
        log.warning("The connection to Redis is back (it was lost for %.1f s).", lasted)
        return True


health = RedisHealth()  # this process's
