"""Periodic jobs: interval and cron schedules fired by one scheduler at a time.

Any number of schedulers may run the same schedule (one per worker started with ``-B``, a
standby...): they compete for a lease in Redis, and only the holder fires. Each firing is
one script that checks the lease holder and its epoch (so a holder that stalled past its
lease cannot fire) and that the entry's due time is later than the one it fired last (so a
due time is fired once, also across a failover). Missed due times (no scheduler ran) are
not caught up: the latest one is fired, as Celery's beat does.

Times are UTC; cron fields follow Celery's ``crontab`` (day_of_week 0 = Sunday).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from redray.durable import keys as K
from redray.durable.client import QueueClient, now_ms
from redray.durable.jobs import JobSpec
from redray.exceptions import GcsUnavailableError

logger = logging.getLogger(__name__)

_DAY_NAMES = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_MONTH_NAMES = {
    name: i + 1
    for i, name in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
    )
}


class Interval:
    """Every ``seconds`` (a number or a timedelta)."""

    def __init__(self, every: float | _dt.timedelta):
        seconds = every.total_seconds() if isinstance(every, _dt.timedelta) else every
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
            raise ValueError(f"a schedule's interval is a positive time, got {every!r}")
        self.ms = int(seconds * 1000)

    def latest_due(self, last_ms: int, now: int) -> int | None:
        """The latest due time after last_ms and not after now (None: not due yet)."""
        if now < last_ms + self.ms:
            return None
        return last_ms + (now - last_ms) // self.ms * self.ms

    def __repr__(self) -> str:
        return f"<every {self.ms / 1000} s>"


def _parse_field(text: Any, low: int, high: int, names: dict[str, int], what: str) -> set[int]:
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if isinstance(text, (set, list, tuple, range)):
        values = {int(v) for v in text}
    elif isinstance(text, str):
        values = set()
        for part in text.lower().replace(" ", "").split(","):
            step = 1
            if "/" in part:
                part, _, step_text = part.partition("/")
                step = int(step_text)
                if step < 1:
                    raise ValueError(f"bad step in the {what} field: {text!r}")
            if part in ("*", ""):
                start, stop = low, high
            elif "-" in part:
                a, _, b = part.partition("-")
                start, stop = int(names.get(a, a)), int(names.get(b, b))
            else:
                start = int(names.get(part, part))
                stop = high if step > 1 else start
            values.update(range(start, stop + 1, step))
    else:
        raise TypeError(f"a crontab {what} field is a string, number or set, got {text!r}")
    if what == "day_of_week":
        values = {7 if v == 0 else v for v in values} | {0 if v == 7 else v for v in values}
        values = {v % 7 for v in values}
    if not values or min(values) < (0 if what == "day_of_week" else low) or max(values) > high:
        raise ValueError(f"the {what} field {text!r} is out of range {low}-{high}")
    return values


class Crontab:
    """Celery's ``crontab(minute, hour, day_of_week, day_of_month, month_of_year)``."""

    def __init__(
        self,
        minute: Any = "*",
        hour: Any = "*",
        day_of_week: Any = "*",
        day_of_month: Any = "*",
        month_of_year: Any = "*",
    ):
        self.spec = (minute, hour, day_of_week, day_of_month, month_of_year)
        self.minutes = _parse_field(minute, 0, 59, {}, "minute")
        self.hours = _parse_field(hour, 0, 23, {}, "hour")
        self.days_of_week = _parse_field(day_of_week, 0, 7, _DAY_NAMES, "day_of_week")
        self.days_of_month = _parse_field(day_of_month, 1, 31, {}, "day_of_month")
        self.months = _parse_field(month_of_year, 1, 12, _MONTH_NAMES, "month_of_year")

    def __repr__(self) -> str:
        return "<crontab: {} {} {} {} {}>".format(*self.spec)

    def _matches_day(self, moment: _dt.datetime) -> bool:
        return (
            moment.month in self.months
            and moment.day in self.days_of_month
            and (moment.isoweekday() % 7) in self.days_of_week
        )

    def next_after(self, moment: _dt.datetime) -> _dt.datetime:
        """The first matching minute strictly after moment (UTC)."""
        t = moment.replace(second=0, microsecond=0) + _dt.timedelta(minutes=1)
        for _ in range(100_000):  # at most a few years of days, hours and minutes
            if not self._matches_day(t):
                t = (t + _dt.timedelta(days=1)).replace(hour=0, minute=0)
            elif t.hour not in self.hours:
                t = (t + _dt.timedelta(hours=1)).replace(minute=0)
            elif t.minute not in self.minutes:
                t += _dt.timedelta(minutes=1)
            else:
                return t
        raise ValueError(f"{self!r} never matches")

    def latest_due(self, last_ms: int, now: int) -> int | None:
        last = _dt.datetime.fromtimestamp(last_ms / 1000, _dt.timezone.utc)
        due = self.next_after(last)
        if due.timestamp() * 1000 > now:
            return None
        while True:
            following = self.next_after(due)
            if following.timestamp() * 1000 > now:
                return int(due.timestamp() * 1000)
            due = following


def as_schedule(value: Any) -> Interval | Crontab:
    """A schedule from a number of seconds, a timedelta, or a schedule object."""
    if isinstance(value, (Interval, Crontab)):
        return value
    inner = getattr(value, "schedule", None)  # Celery's schedule(run_every=...) wrapper
    if isinstance(inner, (Interval, Crontab)):
        return inner
    return Interval(value)


@dataclass
class Entry:
    """A periodic job: its name, schedule and how to make the job it fires."""

    name: str
    schedule: Interval | Crontab
    make_job: Callable[[str], JobSpec]  # given the job id to use


class Beat:
    """Fires the entries of one named schedule while holding its lease (a thread)."""

    def __init__(
        self,
        client: QueueClient,
        schedule_name: str,
        entries: list[Entry],
        tick: float = 0.5,
        lease_ttl: float = 5.0,
    ):
        if lease_ttl <= tick:
            raise ValueError("the beat lease must outlast a tick")
        self.client = client
        self.schedule_name = schedule_name
        self.entries = entries
        self.tick = tick
        self.lease_ttl = lease_ttl
        self.holder = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}"
        self.epoch = 0
        self.fired = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        lease, epoch, last = client.keys.beat(schedule_name)
        self._lease_keys = [lease, epoch]
        self._last_key = last

    def start(self) -> Beat:
        self._thread = threading.Thread(target=self.run, name="redray-beat", daemon=True)
        self._thread.start()
        return self

    def stop(self, release: bool = True) -> None:
        """Stop firing; release: give the lease up at once (a standby takes over on its
        next tick), else it lapses after its TTL."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if release:
            try:
                self.client.gcs.run_script(K.BEAT_RELEASE, self._lease_keys[:1], [self.holder])
            except (redis.RedisError, GcsUnavailableError):
                pass

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except (redis.ConnectionError, redis.TimeoutError, GcsUnavailableError) as exc:
                self.epoch = 0
                logger.warning("beat %s: Redis unreachable (%s)", self.schedule_name, exc)
            except Exception:
                logger.exception("beat %s: a tick failed", self.schedule_name)
            self._stop.wait(self.tick)

    def step(self) -> None:
        """One tick: hold the lease, then fire what is due."""
        gcs = self.client.gcs
        self.epoch = int(
            gcs.run_script(
                K.BEAT_HOLD,
                self._lease_keys,
                [self.holder, int(self.lease_ttl * 1000), int(time.time() * 1_000_000)],
            )
        )
        if not self.epoch:
            return
        now = now_ms()
        pipe = self.client.redis.pipeline(transaction=False)
        for entry in self.entries:
            pipe.hsetnx(self._last_key, entry.name, now)  # a new entry's clock starts now
        pipe.hmget(self._last_key, [e.name for e in self.entries])
        lasts = pipe.execute()[-1] if self.entries else []
        for entry, last in zip(self.entries, lasts, strict=True):
            due = entry.schedule.latest_due(int(last or now), now)
            if due is None:
                continue
            self._fire(entry, due, now)

    def _fire(self, entry: Entry, due: int, now: int) -> None:
        spec = entry.make_job(f"beat-{self.schedule_name}-{entry.name}-{due}")
        _, call_keys, call_args = self.client.enqueue_call(spec, now)
        keys = [*self._lease_keys, self._last_key, *call_keys]
        args = [self.holder, str(self.epoch), entry.name, due, *call_args]
        try:
            if self.client.gcs.run_script(K.BEAT_FIRE, keys, args):
                self.fired += 1
        except redis.ResponseError as exc:
            if "NOTLEADER" not in str(exc):
                raise
            self.epoch = 0
