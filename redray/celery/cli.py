"""``redray worker -A proj``: run consumers of a Celery app's queues, as ``celery worker``.

    redray worker -A proj [-Q emails,reports] [-c 4] [-B] [--address URL]

``-A`` finds the app as Celery does (``proj``, ``proj.celery``, ``proj:app``; the current
directory is importable). The consumers are actors on the cluster of the app's broker URL
(else ``--address``, else the cluster ``redray start`` runs here); they import the app
themselves, with this directory on their path. The command runs until Ctrl-C or SIGTERM,
then stops the consumers gracefully (jobs not started go back to the queue).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from typing import Any

import click

import redray
from redray.durable.actors import find_app


def _load_app(spec: str) -> tuple[Any, str]:
    """The app ``-A`` names and the import path the consumers use."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(f"cannot import {module_name!r}: {exc}", param_hint="-A") from None
    app = getattr(module, attr, None) if attr else find_app(module)
    if app is None or not hasattr(app, "durable_handlers"):
        raise click.BadParameter(f"no Celery app found in {spec!r}", param_hint="-A")
    return app, spec


@click.command("worker")
@click.option("-A", "--app", "app_spec", required=True, help="The app: module or module:attr.")
@click.option(
    "-Q",
    "--queues",
    default=None,
    help="Comma-separated queues (default: the app's default queue).",
)
@click.option("-c", "--concurrency", default=1, show_default=True, help="Consumer actors.")
@click.option(
    "--threads", default=1, show_default=True, help="Consumer threads per actor and queue."
)
@click.option(
    "--prefetch", default=4, show_default=True, help="Jobs each consumer takes at a time."
)
@click.option("-B", "--beat", is_flag=True, help="Also run the beat scheduler (fenced: one fires).")
@click.option(
    "--address", default=None, metavar="URL", help="The cluster, if the broker URL does not say."
)
def worker_command(
    app_spec: str,
    queues: str | None,
    concurrency: int,
    threads: int,
    prefetch: int,
    beat: bool,
    address: str | None,
) -> None:
    """Run consumers of a Celery app's queues on the cluster until interrupted."""
    app, target = _load_app(app_spec)
    if concurrency < 1 or threads < 1:
        raise click.BadParameter("must be at least 1", param_hint="-c/--threads")
    names = [q.strip() for q in queues.split(",") if q.strip()] if queues else [app.default_queue]
    redray.init(address=app.conf.get("broker_url") or address or "auto")
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    consumers = app.start_worker(
        queues=names,
        concurrency=concurrency,
        threads=threads,
        prefetch=prefetch,
        app_path=target,
        sys_path=[os.getcwd()],
    )
    scheduler = app.start_beat() if beat else None
    click.echo(
        f"redray worker: {concurrency} consumer(s) of {', '.join(names)} for app "
        f"{app.main or target}{' with beat' if beat else ''}; pids "
        f"{', '.join(map(str, consumers.pids()))}",
    )
    sys.stdout.flush()
    done.wait()
    click.echo("redray worker: stopping")
    if scheduler is not None:
        scheduler.stop()
    consumers.stop()
    redray.shutdown()
