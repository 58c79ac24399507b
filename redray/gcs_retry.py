"""How a Redis call is retried when Redis does not answer.

Two policies, both redis-py ``Retry`` objects given to the client (every command, pipeline
and script goes through them):

* ``short_retry``: a few quick retries that cover blips and a Sentinel failover's reconnection;
  a longer outage reaches the caller as ``redis.ConnectionError``/``redis.TimeoutError``. For
  the raylet and the control loop, which ride outages out themselves.
* ``RideOutRetry``: retries until Redis answers again, for as long as the outage limit says,
  then raises ``GcsUnavailableError``. For drivers and workers, whose calls that need Redis
  (creating an actor, looking up a named actor) wait for it instead of failing at once.

Imported when a client is made (the redis package is loaded only by processes that use it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from redray.exceptions import GcsUnavailableError
from redray.outage import OUTAGE_ENV, health

RIDE_OUT_BACKOFF_CAP_SECONDS = 1.0  # a call goes through at most this long after Redis is back
RETRIED_ERRORS = (redis.ConnectionError, redis.TimeoutError)


def short_retry(attempts: int, base: float, cap: float) -> Retry:
    """`attempts` retries with jittered exponential backoff (from base, at most cap seconds)."""
    return Retry(
        ExponentialWithJitterBackoff(cap=cap, base=base), attempts, supported_errors=RETRIED_ERRORS
    )


class RideOutRetry(Retry):
    """Retry a call that failed on a lost connection or a timeout until it succeeds, or until
    ``limit()`` seconds (read at each failure) have passed since its first failure, and at
    least the retries a blip needs were made (so 0 behaves as the short retries); then raise
    GcsUnavailableError. Tells the process's health once those retries are spent (Redis is
    really gone) and when a call goes through again."""

    def __init__(self, limit: Callable[[], float], blip_attempts: int, base: float):
        super().__init__(
            ExponentialWithJitterBackoff(cap=RIDE_OUT_BACKOFF_CAP_SECONDS, base=base),
            -1,
            supported_errors=RETRIED_ERRORS,
        )
        self._limit = limit
        self._blip_attempts = blip_attempts  # failures that are a blip, not yet an outage
        self._base = base

    def __deepcopy__(self, memo: dict) -> RideOutRetry:
        # Each connection gets a copy; the limit (the client's) stays shared.
        copy = RideOutRetry(self._limit, self._blip_attempts, self._base)
        copy._supported_errors = self._supported_errors
        return copy

    def call_with_retry(
        self,
        do: Callable[[], Any],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> Any:
        failures = 0
        first_failure = 0.0
        while True:
            try:
                result = do()
            except self._supported_errors as error:
                if is_retryable is not None and not is_retryable(error):
                    raise
                failures += 1
                if with_failure_count:
                    fail(error, failures)
                else:
                    fail(error)
                now = time.monotonic()
                if failures == 1:
                    first_failure = now
                elif failures == self._blip_attempts + 1:
                    health.lost(error)
                limit = self._limit()
                waited = now - first_failure
                if waited >= limit and failures > self._blip_attempts:
                    raise GcsUnavailableError(
                        f"Redis (the cluster's control store) did not answer for {waited:.1f} s "
                        f"({type(error).__name__}: {error}); gave up waiting after "
                        f"{limit:g} s ({OUTAGE_ENV})."
                    ) from error
                pause = self._backoff.compute(failures)
                if failures > self._blip_attempts:
                    pause = min(pause, limit - waited)
                time.sleep(pause)
            else:
                if health.down:
                    health.back()
                return result
