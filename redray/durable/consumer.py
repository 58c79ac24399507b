"""A consumer: the loop that takes jobs from one queue, runs them and stores their outcome.

Delivery is at least once. A job is taken with XREADGROUP (it becomes pending for this
consumer, state STARTED) and acknowledged by the same script that stores its result, so a
consumer that dies between the two leaves the job pending. Each consumer keeps a heartbeat
key alive in Redis from a thread of its own; other consumers take over (XCLAIM) the
pending jobs of consumers whose heartbeat has lapsed, never those of a live one, however
long its job runs. A reclaimer that was itself cut off from Redis waits one heartbeat TTL
before reclaiming, so consumers that were cut off too can beat again first.

Threads: ``run()`` owns the loop (fetch, run, finish, reclaim); the heartbeat thread only
renews the key. ``stop()`` may be called from any thread.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from redray.durable import jobs as jobmod
from redray.durable import keys as K
from redray.durable.client import QueueClient, now_ms
from redray.durable.jobs import JobContext, JobOptions, Retry
from redray.exceptions import GcsUnavailableError

logger = logging.getLogger(__name__)

REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, GcsUnavailableError)
BACKOFF_MAX_SECONDS = 1.0
PROMOTE_LIMIT = 100


@dataclass
class ConsumerSettings:
    """How a consumer reads and how fast it notices a dead peer."""

    prefetch: int = 4  # jobs taken per read; each is re-run if this consumer dies
    heartbeat_ttl: float = 10.0  # s a heartbeat lives; a dead consumer's jobs wait this long
    block_seconds: float = 0.1  # longest wait for new jobs before looking at due ones again
    queue_rate_limit: float = 0.0  # jobs/s for the whole queue (0: none)
    rate_burst: float = 0.0  # tokens the bucket holds (default: one second's worth)

    def check(self) -> ConsumerSettings:
        if not isinstance(self.prefetch, int) or self.prefetch < 1:
            raise ValueError(f"prefetch is a positive integer, got {self.prefetch!r}")
        if not self.heartbeat_ttl > 0:
            raise ValueError(f"heartbeat_ttl is a positive time, got {self.heartbeat_ttl!r}")
        if not self.block_seconds > 0:
            raise ValueError(f"block_seconds is a positive time, got {self.block_seconds!r}")
        return self


@dataclass
class Taken:
    """A job as FETCH/RECLAIM answered it."""

    stream: str
    entry: str
    job_id: str
    name: str
    payload: bytes
    options: JobOptions
    retries: int
    deliveries: int
    parent_result: bytes | None
    header_results: list[bytes] | None


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class Consumer:
    """Takes and runs the jobs of one queue; ``handlers(name)`` finds each job's function."""

    def __init__(
        self,
        client: QueueClient,
        queue: str,
        handlers: Callable[[str], Callable[..., Any] | None],
        settings: ConsumerSettings | None = None,
        name: str | None = None,
        wrap: Callable[[Callable[..., Any], JobContext, tuple, dict], Any] | None = None,
    ):
        self.client = client
        self.keys = client.keys
        self.queue = queue
        self.handlers = handlers
        self.wrap = wrap
        self.settings = (settings or ConsumerSettings()).check()
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}"
        self.streams = self.keys.streams(queue)
        self._stopping = threading.Event()
        # Since when Redis has answered without a break; a fresh consumer may reclaim at
        # once, one that was cut off waits a TTL (its peers may have been cut off too).
        self._connected_since: float | None = -math.inf
        self._next_reclaim = 0.0
        self._rng = random.Random()
        self._unfinished: list[Taken] = []
        self._pending_finish: list[tuple[str, list[str], list[Any]]] = []
        self.ran = 0  # jobs run by this consumer (read by stats)
        self._beater: threading.Thread | None = None

    # -- life ---------------------------------------------------------------------------
    def stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _register(self) -> None:
        info = json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        )
        pipe = self.client.redis.pipeline(transaction=True)
        pipe.set(self.keys.heartbeat(self.queue, self.name), "1", px=self._ttl_ms)
        pipe.hset(self.keys.consumers(self.queue), self.name, info)
        pipe.sadd(self.keys.queues(), self.queue)
        pipe.execute()

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.settings.heartbeat_ttl * 1000))

    def _beat(self) -> None:
        """Renew the heartbeat every third of its TTL until stopped."""
        key = self.keys.heartbeat(self.queue, self.name)
        interval = self.settings.heartbeat_ttl / 3
        while not self._stopping.wait(interval):
            try:
                self.client.redis.set(key, "1", px=self._ttl_ms)
            except REDIS_ERRORS:
                pass  # the loop notices the outage itself

    def run(self) -> None:
        """Consume until stop(); rides Redis outages out (resumes when Redis is back)."""
        pause = 0.05
        self._beater = threading.Thread(
            target=self._beat, name=f"redray-dq-heartbeat-{self.queue}", daemon=True
        )
        registered = False
        try:
            while not self._stopping.is_set():
                try:
                    if not registered:
                        self._register()
                        registered = True
                        if not self._beater.is_alive():
                            self._beater.start()
                    if self._connected_since is None:
                        self._connected_since = time.monotonic()
                    self._step()
                    pause = 0.05
                except REDIS_ERRORS as exc:
                    self._connected_since = None
                    registered = False
                    logger.warning("queue %s: Redis unreachable (%s); retrying", self.queue, exc)
                    pause = self._pause(pause)
                except Exception:
                    # A bug or a Redis error reply must not silently end the consumer: the
                    # actor would live on without consuming.
                    logger.exception("queue %s: consumer step failed; retrying", self.queue)
                    pause = self._pause(pause)
        finally:
            self._stopping.set()
            self._leave()

    def _pause(self, pause: float) -> float:
        """Wait a jittered pause (or until stopped); the next, doubled up to the cap."""
        self._stopping.wait(pause * (0.5 + self._rng.random()))
        return min(BACKOFF_MAX_SECONDS, pause * 2)

    def _leave(self) -> None:
        """Hand back jobs taken and not run, and forget this consumer."""
        try:
            self._flush()
            for taken in self._unfinished:
                self._defer(taken, now_ms(), K.PENDING, taken.retries, "", "")
            self._flush()
            self._unfinished = []
            pipe = self.client.redis.pipeline(transaction=False)
            pipe.delete(self.keys.heartbeat(self.queue, self.name))
            pipe.hdel(self.keys.consumers(self.queue), self.name)
            pipe.execute()
        except REDIS_ERRORS:
            pass  # the heartbeat lapses and peers reclaim what this consumer held

    # -- one step -------------------------------------------------------------------------
    def _step(self) -> None:
        self._flush()
        if self._unfinished:
            self._run_taken()
            return
        now = time.monotonic()
        ttl = self.settings.heartbeat_ttl
        if now >= self._next_reclaim:
            self._next_reclaim = now + ttl / 2
            self._unfinished = self._orphans()
            if not self._unfinished and now - (self._connected_since or now) >= ttl:
                self._unfinished = self._reclaim()
            if self._unfinished:
                return
        taken, next_due, rate_wait = self._fetch()
        if taken:
            self._unfinished = taken
            return
        wait = self.settings.block_seconds
        if next_due is not None:
            wait = min(wait, max(0.0, (next_due - now_ms()) / 1000))
        if rate_wait:
            self._stopping.wait(min(self.settings.block_seconds, rate_wait / 1000))
            return
        if wait > 0.001:
            self._unfinished = self._block(wait)

    def _fetch(self) -> tuple[list[Taken], int | None, int]:
        s = self.settings
        burst = s.rate_burst or max(1.0, s.queue_rate_limit)
        reply = self.client.gcs.run_script(
            K.FETCH,
            [*self.streams, self.keys.delayed(self.queue), self.keys.queue_rate(self.queue)],
            [
                self.name,
                s.prefetch,
                now_ms(),
                self.keys.job_prefix,
                self.keys.queue_prefix,
                self.queue,
                PROMOTE_LIMIT,
                repr(float(s.queue_rate_limit)),
                repr(float(burst)),
            ],
        )
        jobs, next_due, rate_wait = reply
        due = int(float(next_due)) if next_due not in (b"", "", None) else None
        return self._decode(jobs), due, int(rate_wait)

    def _orphans(self) -> list[Taken]:
        """Jobs pending for this consumer that it does not know it holds: a take whose
        reply was lost (Redis died, or the client retried a timed-out call after the
        script had run). Called when everything taken so far is finished and written, so
        every entry still pending for this consumer is one of those; they are taken again.
        Without this a live consumer would hold them for ever (its heartbeat keeps peers
        away)."""
        read = self.client.redis.xreadgroup(
            K.GROUP, self.name, {stream: "0" for stream in self.streams}, count=1000
        )
        entries = [
            (_text(stream), _text(eid), _text((fields or {}).get(b"id", b"")))
            for stream, items in read or []
            for eid, fields in items
        ]
        if not entries:
            return []
        logger.warning(
            "queue %s: taking back %d jobs whose take was lost", self.queue, len(entries)
        )
        return self._take(entries)

    def _reclaim(self) -> list[Taken]:
        reply = self.client.gcs.run_script(
            K.RECLAIM,
            [*self.streams, self.keys.consumers(self.queue)],
            [
                self.name,
                self.settings.prefetch,
                now_ms(),
                self.keys.job_prefix,
                self.keys.heartbeat_prefix(self.queue),
                self._ttl_ms,
            ],
        )
        taken = self._decode(reply)
        if taken:
            logger.info("queue %s: took over %d jobs of dead consumers", self.queue, len(taken))
        return taken

    def _block(self, seconds: float) -> list[Taken]:
        """Wait up to seconds for a new entry, then take what arrived (through RECLAIM's
        twin: the entries are already ours, so FETCH reads nothing new; TAKE them)."""
        block_ms = max(1, int(min(seconds, self.client.gcs.blocking_max) * 1000))
        read = self.client.redis.xreadgroup(
            K.GROUP,
            self.name,
            {stream: ">" for stream in self.streams},
            count=self.settings.prefetch,
            block=block_ms,
        )
        if not read:
            return []
        entries = [
            (_text(stream), _text(eid), _text(fields.get(b"id", b"")))
            for stream, items in read
            for eid, fields in items
        ]
        return self._take(entries)

    def _take(self, entries: list[tuple[str, str, str]]) -> list[Taken]:
        args: list[Any] = [self.name, now_ms(), self.keys.job_prefix]
        for stream, eid, job_id in entries:
            args += [stream, eid, job_id]
        return self._decode(self.client.gcs.run_script(K.TAKE_ENTRIES, [], args))

    def _decode(self, rows: list[Any]) -> list[Taken]:
        out = []
        for level, eid, job_id, name, payload, opts, retries, deliveries, parent, header in rows:
            out.append(
                Taken(
                    self.streams[int(level)],
                    _text(eid),
                    _text(job_id),
                    _text(name),
                    payload,
                    JobOptions.from_json(opts),
                    int(retries),
                    int(deliveries),
                    parent or None,
                    list(header) if header else None,
                )
            )
        return out

    # -- running -----------------------------------------------------------------------------
    def _run_taken(self) -> None:
        while self._unfinished and not self._stopping.is_set():
            taken = self._unfinished[0]
            started = time.perf_counter()
            try:
                self._run_one(taken)
            except REDIS_ERRORS:
                raise
            except Exception as exc:  # finding or decoding the job failed, not the job
                self._fail(taken, exc, traceback.format_exc())
            self._unfinished.pop(0)
            quick = time.perf_counter() - started < 0.001
            if not (quick and self._unfinished and len(self._pending_finish) < 64):
                self._flush()
        self._flush()

    def _flush(self) -> None:
        if self._pending_finish:
            calls, self._pending_finish = self._pending_finish, []
            try:
                self.client.gcs.run_scripts(calls)
            except REDIS_ERRORS:
                self._pending_finish = calls + self._pending_finish
                raise

    def _run_one(self, taken: Taken) -> None:
        opts = taken.options
        if taken.deliveries > opts.max_deliveries:
            self._finish(
                taken,
                K.FAILURE,
                None,
                f"WorkerLostError: the consumers running job {taken.job_id} died "
                f"{taken.deliveries - 1} times",
                "",
            )
            return
        if opts.rate_limit > 0:
            wait = int(
                self.client.gcs.run_script(
                    K.TAKE_TOKEN,
                    [self.keys.name_rate(taken.name)],
                    [now_ms(), repr(float(opts.rate_limit)), repr(max(1.0, opts.rate_limit))],
                )
            )
            if wait:
                self._defer(taken, now_ms() + wait, K.PENDING, taken.retries, "", "")
                return
        fn = self.handlers(taken.name)
        if fn is None:
            error = jobmod.NotRegisteredError(
                f"no function named {taken.name!r} is registered with the consumers of "
                f"queue {self.queue!r} or importable by that name"
            )
            self._finish(taken, K.FAILURE, jobmod.dumps(error), repr(error), "")
            return
        try:
            args, kwargs = jobmod.loads(taken.payload)
            if taken.header_results is not None and opts.pass_parent:
                args = ([jobmod.loads(r) if r else None for r in taken.header_results], *args)
            elif opts.pass_parent and taken.parent_result is not None:
                args = (jobmod.loads(taken.parent_result), *args)
        except Exception as exc:
            self._finish(taken, K.FAILURE, None, f"cannot decode the job's arguments: {exc!r}", "")
            return
        job = JobContext(
            taken.job_id,
            taken.name,
            self.queue,
            taken.retries,
            taken.deliveries,
            opts,
            tuple(args),
            kwargs,
            self.name,
        )
        jobmod.set_current_job(job)
        try:
            if self.wrap is not None:
                result = self.wrap(fn, job, tuple(args), kwargs)
            else:
                result = fn(*args, **kwargs)
        except Retry as request:
            self._retry(taken, request.exc, request, traceback.format_exc())
        except Exception as exc:
            if opts.autoretry_for and jobmod.matches(exc, opts.autoretry_for):
                self._retry(taken, exc, None, traceback.format_exc())
            else:
                self._fail(taken, exc, traceback.format_exc())
        else:
            try:
                blob = jobmod.dumps(result)
            except Exception as exc:
                self._fail(taken, exc, traceback.format_exc())
            else:
                self._finish(taken, K.SUCCESS, blob, "", "")
        finally:
            jobmod.set_current_job(None)
            self.ran += 1

    def _fail(self, taken: Taken, exc: BaseException, tb: str) -> None:
        try:
            blob = jobmod.dumps(exc)
        except Exception:
            blob = None
        self._finish(taken, K.FAILURE, blob, repr(exc), tb)

    def _retry(
        self, taken: Taken, exc: BaseException | None, request: Retry | None, tb: str
    ) -> None:
        opts = taken.options
        limit = (
            request.max_retries if request and request.max_retries is not None else opts.max_retries
        )
        if limit is not None and taken.retries >= limit:
            if exc is None:
                exc = jobmod.JobError(
                    f"job {taken.job_id} ({taken.name}) exceeded its {limit} retries"
                )
            self._fail(taken, exc, tb)
            return
        if request is not None and request.eta is not None:
            due = jobmod.to_ms(request.eta)
        elif request is not None and request.countdown is not None:
            due = now_ms() + int(request.countdown * 1000)
        elif opts.retry_backoff:
            delay = jobmod.backoff_seconds(
                taken.retries,
                opts.retry_backoff,
                opts.retry_backoff_max,
                opts.retry_jitter,
                self._rng,
            )
            due = now_ms() + int(delay * 1000)
        else:
            due = now_ms() + int(opts.default_retry_delay * 1000)
        self._defer(taken, due, K.RETRY, taken.retries + 1, repr(exc) if exc else "retry", tb)

    def _defer(self, taken: Taken, due: int, state: str, retries: int, error: str, tb: str) -> None:
        self._pending_finish.append(
            (
                K.DEFER,
                [self.keys.job(taken.job_id), taken.stream, self.keys.delayed(self.queue)],
                [taken.entry, taken.job_id, due, state, retries, error, tb],
            )
        )

    def _finish(self, taken: Taken, state: str, result: bytes | None, error: str, tb: str) -> None:
        self._pending_finish.append(
            (
                K.FINISH,
                [self.keys.job(taken.job_id), taken.stream, self.keys.dlq(self.queue)],
                [
                    taken.entry,
                    state,
                    now_ms(),
                    K.RESULT_TTL_FROM_JOB,
                    result or b"",
                    error,
                    tb,
                    self.keys.job_prefix,
                    self.keys.queue_prefix,
                    self.keys.chord_prefix,
                    K.DLQ_MAXLEN,
                    taken.job_id,
                ],
            )
        )
