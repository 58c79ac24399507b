"""A Celery-compatible front end on redray's durable queues: a Celery project moves to redray
by changing its import.

    from redray.celery import Celery, shared_task, chain, group, chord

    app = Celery("proj", broker="redis://:PASSWORD@HEAD:6379")   # the cluster's Redis

    @app.task(bind=True, max_retries=3, autoretry_for=(IOError,), retry_backoff=True)
    def fetch(self, url): ...

Workers: ``redray worker -A proj [-Q q1,q2] [-c N] [-B]``. See docs/queues.md for what maps
to what and what is not supported.
"""

from redray.celery import exceptions, states
from redray.celery.app import Celery, current_app, shared_task
from redray.celery.canvas import Signature, chain, chord, group, signature
from redray.celery.result import AsyncResult, GroupResult
from redray.celery.schedules import crontab, schedule
from redray.celery.task import Task

__all__ = [
    "AsyncResult",
    "Celery",
    "GroupResult",
    "Signature",
    "Task",
    "chain",
    "chord",
    "crontab",
    "current_app",
    "exceptions",
    "group",
    "schedule",
    "shared_task",
    "signature",
    "states",
]
