"""Celery's beat schedules: ``crontab(...)`` and ``schedule(run_every=timedelta)`` (a number
of seconds or a timedelta works too)."""

from __future__ import annotations

import datetime as _dt

from redray.durable.beat import Crontab, Interval

crontab = Crontab


class schedule:  # noqa: N801 - Celery's name
    """Every ``run_every`` (seconds or a timedelta)."""

    def __init__(self, run_every: float | _dt.timedelta, **_: object):
        self.run_every = run_every
        self.schedule = Interval(run_every)


__all__ = ["crontab", "schedule"]
