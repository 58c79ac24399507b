"""The durable queues of one cluster, as a driver (or any process) uses them: enqueue jobs
and workflows, read states and results, revoke, inspect, purge and re-drive.

Needs only the cluster's Redis: a process that enqueues does not have to be a redray
driver, and a job it enqueued survives it (one script writes the job and its stream entry,
so the job is there once the call returns, and is not there at all if it never reached
Redis).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from typing import Any

import redis

from redray.core import context
from redray.durable import jobs as jobmod
from redray.durable import keys as K
from redray.durable.jobs import (
    ChordError,
    JobFailedError,
    JobRevokedError,
    JobSpec,
    JobTimeoutError,
    WorkerLostError,
)
from redray.gcs import DEFAULT_CLUSTER, URL_SCHEMES, Gcs

POLL_MIN_SECONDS = 0.002
POLL_MAX_SECONDS = 0.1
BATCH = 500  # jobs per round trip when enqueueing or polling many


def connect(address: str | None = None, cluster: str | None = None) -> Gcs:
    """A GCS client of the cluster whose queues to use: ``address`` (a Redis URL, or
    "auto" for the cluster ``redray start`` runs here); without one, the cluster this
    process is connected to, else REDRAY_ADDRESS, else "auto"."""
    from redray.node import launch as node

    if address is None:
        worker = context.current
        if worker is not None:
            return Gcs(worker.gcs.url, worker.gcs.cluster)
        address = os.environ.get("REDRAY_ADDRESS") or "auto"
    if address == "auto":
        current = node.read_current_cluster()
        if current is None:
            raise ConnectionError(
                "no redray cluster to keep the queues in: give a Redis URL, connect with "
                "redray.init(), or start one with `redray start --head`"
            )
        return Gcs(current["gcs_url"], cluster or current.get("cluster", DEFAULT_CLUSTER))
    if not address.startswith(URL_SCHEMES):
        raise ValueError(f"unsupported Redis URL {address!r}: use one of {', '.join(URL_SCHEMES)}")
    return Gcs(address, cluster or DEFAULT_CLUSTER)


def now_ms() -> int:
    return int(time.time() * 1000)


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else ("" if raw is None else str(raw))


class QueueClient:
    """Reads and writes the durable queues of one cluster (thread-safe)."""

    def __init__(self, gcs: Gcs):
        self.gcs = gcs
        self.keys = K.QueueKeys(gcs)

    @property
    def redis(self) -> redis.Redis:
        return self.gcs.redis

    # -- enqueueing ---------------------------------------------------------------------
    def enqueue_call(self, spec: JobSpec, now: int) -> tuple[str, list[str], list[Any]]:
        keys = [self.keys.job(spec.job_id), self.keys.queues(), self.keys.delayed(spec.queue)]
        args = [
            self.keys.queue_prefix,
            spec.queue,
            str(jobmod.level_of(spec.priority)),
            spec.job_id,
            str(spec.due_ms),
            str(now),
            "1" if spec.waiting else "",
            *spec.fields(),
        ]
        return K.ENQUEUE, keys, args

    def enqueue(self, spec: JobSpec) -> bool:
        """Write one job (one round trip). False when a job with its id exists already:
        de-duplicated, nothing written."""
        check_queue_name(spec.queue)
        return bool(self.gcs.run_script(*self.enqueue_call(spec, now_ms())))

    def enqueue_many(self, specs: list[JobSpec], atomic: bool = False) -> list[bool]:
        """Write jobs in order, BATCH per round trip; atomic: all or none (one transaction,
        for a workflow whose jobs refer to each other)."""
        for spec in specs:
            check_queue_name(spec.queue)
        now = now_ms()
        calls = [self.enqueue_call(spec, now) for spec in specs]
        if atomic:
            return [bool(r) for r in self._transaction(calls)]
        out: list[bool] = []
        for start in range(0, len(calls), BATCH):
            out += [bool(r) for r in self.gcs.run_scripts(calls[start : start + BATCH])]
        return out

    def _transaction(self, calls: list[tuple[str, list[str], list[Any]]]) -> list[Any]:
        pipe = self.redis.pipeline(transaction=True)
        for source, keys, args in calls:
            pipe.eval(source, len(keys), *keys, *args)
        return pipe.execute()

    def chain(self, specs: list[JobSpec]) -> list[str]:
        """Enqueue a chain atomically: the first job now, each next one parked until the one
        before it succeeds (then released exactly once by the script that stores that
        result). Returns the job ids."""
        for spec, nxt in zip(specs, specs[1:], strict=False):
            spec.children = [*spec.children, nxt.job_id]
        for spec in specs[1:]:
            spec.waiting = True
        self.workflow(specs, [])
        return [spec.job_id for spec in specs]

    def chord(
        self, header: list[JobSpec], callback: JobSpec, chord_id: str, pass_results: bool = True
    ) -> None:
        """Enqueue a chord atomically: the callback parked until every header job has
        finished; the finish that completes the count releases it (once: members are counted
        once each, re-runs included). pass_results: the callback gets the list of the header's
        results as its first argument."""
        callback.options.pass_parent = pass_results
        callback.header = [spec.job_id for spec in header]
        callback.waiting = bool(header)
        for spec in header:
            spec.chord = chord_id
        chords = [(chord_id, len(header), callback.job_id)] if header else []
        self.workflow([callback, *header], chords)

    def workflow(self, specs: list[JobSpec], chords: list[tuple[str, int, str]]) -> None:
        """Enqueue linked jobs (chains, groups, chords: ``children``, ``waiting``, ``chord``
        and ``header`` already set) and register the chords (id, size, callback id), all in
        one transaction."""
        for spec in specs:
            check_queue_name(spec.queue)
        now = now_ms()
        calls = [(K.CHORD_CREATE, [self.keys.chord(c)], [size, cb]) for c, size, cb in chords]
        calls += [self.enqueue_call(spec, now) for spec in specs]
        self._transaction(calls)

    # -- states and results ---------------------------------------------------------------
    def job_fields(self, job_id: str, *names: str) -> list[Any]:
        return self.redis.hmget(self.keys.job(job_id), names)

    def state(self, job_id: str) -> str:
        """PENDING (also for unknown ids, as Celery), STARTED, RETRY, SUCCESS, FAILURE or
        REVOKED."""
        return _text(self.redis.hget(self.keys.job(job_id), "state")) or K.PENDING

    def info(self, job_id: str) -> dict[str, Any]:
        """The job's stored fields (payload and result left out), decoded."""
        raw = self.redis.hgetall(self.keys.job(job_id))
        return {_text(k): _text(v) for k, v in raw.items() if k not in (b"payload", b"result")}

    def states(self, job_ids: list[str]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(job_ids), BATCH):
            pipe = self.redis.pipeline(transaction=False)
            for job_id in job_ids[start : start + BATCH]:
                pipe.hget(self.keys.job(job_id), "state")
            out += [_text(s) or K.PENDING for s in pipe.execute()]
        return out

    def outcome(self, job_id: str) -> tuple[str, Any]:
        """(state, value): the result for SUCCESS, the exception for FAILURE/REVOKED, None
        otherwise."""
        state, result, error, traceback = self.job_fields(
            job_id, "state", "result", "error", "traceback"
        )
        state = _text(state) or K.PENDING
        if state == K.SUCCESS:
            return state, jobmod.loads(result)
        if state == K.FAILURE:
            return state, failure_exception(result, _text(error), _text(traceback))
        if state == K.REVOKED:
            return state, JobRevokedError(f"job {job_id} was {_text(error) or 'revoked'}")
        return state, None

    def wait(self, job_ids: list[str], timeout: float | None = None) -> None:
        """Block until every job is in a ready state (SUCCESS, FAILURE, REVOKED); raises
        JobTimeoutError after timeout seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        remaining = list(job_ids)
        pause = POLL_MIN_SECONDS
        while remaining:
            states = self.states(remaining)
            remaining = [
                j for j, s in zip(remaining, states, strict=False) if s not in K.READY_STATES
            ]
            if not remaining:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeoutError(
                    f"{len(remaining)} of {len(job_ids)} jobs not done within {timeout} s"
                )
            time.sleep(pause)
            pause = min(POLL_MAX_SECONDS, pause * 1.5)

    def get(self, job_id: str, timeout: float | None = None, propagate: bool = True) -> Any:
        """The job's result once it is ready; its exception is raised if it failed (with
        propagate), JobTimeoutError after timeout seconds."""
        self.wait([job_id], timeout)
        state, value = self.outcome(job_id)
        if state != K.SUCCESS and propagate:
            raise value
        return value

    def revoke(self, job_id: str, result_ttl: float = jobmod.DEFAULT_RESULT_TTL) -> bool:
        """Revoke a job that has not finished: it will not start (one already running runs
        to its end). False when it had finished (or never existed)."""
        return bool(
            self.gcs.run_script(
                K.REVOKE,
                [self.keys.job(job_id)],
                [self.keys.queue_prefix, job_id, now_ms(), int(result_ttl * 1000)],
            )
        )

    def forget(self, job_id: str) -> None:
        """Delete a finished job's state and result."""
        self.redis.delete(self.keys.job(job_id))

    # -- queues ------------------------------------------------------------------------------
    def queue_names(self) -> list[str]:
        return sorted(_text(q) for q in self.redis.smembers(self.keys.queues()))

    def stats(self, queue: str) -> dict[str, int]:
        """Depth (waiting in the streams), in-flight (delivered, not acknowledged), delayed,
        failed (dead-lettered) and live consumers of a queue."""
        pipe = self.redis.pipeline(transaction=False)
        streams = self.keys.streams(queue)
        for stream in streams:
            pipe.xlen(stream)
        for stream in streams:
            pipe.xpending(stream, K.GROUP)
        pipe.zcard(self.keys.delayed(queue))
        pipe.xlen(self.keys.dlq(queue))
        pipe.hkeys(self.keys.consumers(queue))
        replies = pipe.execute(raise_on_error=False)
        levels = len(streams)
        lengths = [r if isinstance(r, int) else 0 for r in replies[:levels]]
        pending = [
            r[0] if isinstance(r, (list, tuple)) and r else 0 for r in replies[levels : 2 * levels]
        ]
        consumers = [_text(c) for c in replies[2 * levels + 2]]
        alive = 0
        if consumers:
            pipe = self.redis.pipeline(transaction=False)
            for name in consumers:
                pipe.exists(self.keys.heartbeat(queue, name))
            alive = sum(bool(x) for x in pipe.execute())
        in_flight = sum(pending)
        return {
            "depth": max(0, sum(lengths) - in_flight),
            "in_flight": in_flight,
            "delayed": replies[2 * levels],
            "failed": replies[2 * levels + 1],
            "consumers": alive,
        }

    def consumers(self, queue: str) -> dict[str, dict[str, Any]]:
        """The queue's live consumers: name -> {pid, host, started}."""
        raw = self.redis.hgetall(self.keys.consumers(queue))
        names = [_text(k) for k in raw]
        if not names:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.exists(self.keys.heartbeat(queue, name))
        alive = pipe.execute()
        return {
            name: json.loads(raw[name.encode()])
            for name, live in zip(names, alive, strict=False)
            if live
        }

    def dead_letters(self, queue: str, count: int = 100) -> list[dict[str, str]]:
        """The oldest dead-lettered jobs (up to count): id, name, error, time."""
        entries = self.redis.xrange(self.keys.dlq(queue), count=count)
        return [
            {"entry": _text(eid), **{_text(k): _text(v) for k, v in fields.items()}}
            for eid, fields in entries
        ]

    def redrive(self, queue: str, count: int = 1000) -> int:
        """Put up to count dead-lettered jobs back on their queue (retries reset); how many
        went back."""
        return int(
            self.gcs.run_script(
                K.REDRIVE,
                [self.keys.dlq(queue)],
                [self.keys.queue_prefix, queue, self.keys.job_prefix, count],
            )
        )

    def purge(self, queue: str) -> int:
        """Drop the jobs waiting in a queue (its streams' unread entries and its delayed
        set); jobs being run are left to finish. How many were dropped."""
        dropped = 0
        for stream in self.keys.streams(queue):
            entries = self.redis.xrange(stream)
            pending = (
                self.redis.xpending_range(stream, K.GROUP, "-", "+", len(entries))
                if entries
                else []
            )
            running = {_text(p["message_id"]) for p in pending}
            ids = [eid for eid, _ in entries if _text(eid) not in running]
            job_ids = [_text(f.get(b"id")) for eid, f in entries if _text(eid) not in running]
            if ids:
                pipe = self.redis.pipeline(transaction=False)
                pipe.xdel(stream, *ids)
                pipe.delete(*[self.keys.job(j) for j in job_ids])
                pipe.execute()
            dropped += len(ids)
        delayed = self.keys.delayed(queue)
        job_ids = [_text(j) for j in self.redis.zrange(delayed, 0, -1)]
        if job_ids:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrem(delayed, *job_ids)
            pipe.delete(*[self.keys.job(j) for j in job_ids])
            pipe.execute()
        return dropped + len(job_ids)


def check_queue_name(queue: str) -> None:
    if not isinstance(queue, str) or not queue or ":" in queue or len(queue) > 200:
        raise ValueError(f"a queue name is a non-empty string without ':', got {queue!r}")


def failure_exception(result: bytes | None, error: str, traceback: str) -> BaseException:
    """The exception a failed job stored, or a JobError describing it."""
    if result:
        try:
            exc = jobmod.loads(result)
        except Exception:
            exc = None
        if isinstance(exc, BaseException):
            return exc
    if error.startswith("ChordError"):
        return ChordError(error)
    if error.startswith("WorkerLostError"):
        return WorkerLostError(error)
    return JobFailedError(f"{error}\n{traceback}".strip())


def iter_chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
