"""A small Celery project, as a Celery user writes it; only the imports name redray.celery.

Used by tests/test_celery.py and tests/test_queue_cli.py (`redray worker -A celery_proj`)."""

import os
from datetime import timedelta

import redray
from redray.celery import Celery, shared_task

app = Celery("celery_proj", broker=os.environ.get("CELERY_PROJ_BROKER"))
app.conf.update(
    task_routes={"celery_proj.send_email": {"queue": "emails"}},
    result_expires=3600,
    task_acks_late=True,
    worker_hijack_root_logger=False,
    beat_schedule={
        "tick-every-half-second": {
            "task": "celery_proj.tick",
            "schedule": timedelta(seconds=0.5),
            "args": (os.environ.get("CELERY_PROJ_TICKS", "/dev/null"),),
        }
    },
)


@app.task
def add(x, y):
    return x + y


@app.task
def mul(x, y):
    return x * y


@app.task
def tsum(numbers):
    return sum(numbers)


@app.task
def send_email(to):
    return f"sent to {to}"


@app.task(bind=True, max_retries=3, default_retry_delay=0.05)
def flaky(self, until):
    if self.request.retries < until:
        raise self.retry(exc=ConnectionError("try again"))
    return [self.request.id, self.request.retries]


@app.task(autoretry_for=(OSError,), retry_backoff=0.01, max_retries=2)
def always_oserror():
    raise OSError("disk on fire")


@app.task(bind=True)
def tick(self, path):
    with open(path, "a") as f:
        f.write(self.request.id + "\n")


@shared_task
def double(x):
    return 2 * x


@redray.remote
def ray_square(x):
    return x * x


@app.task
def via_redray(x):
    return redray.get(ray_square.remote(x))
