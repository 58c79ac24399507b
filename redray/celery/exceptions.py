"""Celery's exception names, as redray raises them."""

from __future__ import annotations

from redray.durable.jobs import (
    ChordError,
    JobError,
    JobRevokedError,
    JobTimeoutError,
    NotRegisteredError,
    Retry,
    WorkerLostError,
)


class CeleryError(JobError):
    """Base of Celery's errors (here: of the durable queue's)."""


class MaxRetriesExceededError(CeleryError):
    """``self.retry()`` was called past the task's max_retries, without an exception."""


TimeoutError = JobTimeoutError  # noqa: A001 - Celery's name (also a builtin TimeoutError)
TaskRevokedError = JobRevokedError

__all__ = [
    "CeleryError",
    "ChordError",
    "MaxRetriesExceededError",
    "NotRegisteredError",
    "Retry",
    "TaskRevokedError",
    "TimeoutError",
    "WorkerLostError",
]
