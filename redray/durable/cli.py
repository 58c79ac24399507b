"""``redray queue ...``: inspect and operate the durable queues of a cluster.

redray queue list [--address URL]            # every queue: depth, in-flight, delayed, ...
redray queue inspect QUEUE                   # one queue, its consumers and dead letters
redray queue purge QUEUE [--yes]             # drop the jobs waiting in it
redray queue dlq QUEUE [--count N]           # the dead-lettered jobs
redray queue retry-dlq QUEUE [--count N]     # put dead-lettered jobs back on the queue
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import click
import redis

from redray.durable.client import QueueClient, check_queue_name, connect
from redray.exceptions import GcsUnavailableError

COLUMNS = ("depth", "in_flight", "delayed", "failed", "consumers")


def address_options(func):
    func = click.option(
        "--address",
        default=None,
        metavar="URL",
        help='The cluster\'s Redis URL (default: REDRAY_ADDRESS, else "auto": the cluster '
        "`redray start` runs here).",
    )(func)
    return click.option("--cluster", default=None, help="Cluster name (default: 'default').")(func)


@contextmanager
def _client(address: str | None, cluster: str | None) -> Iterator[QueueClient]:
    try:
        client = QueueClient(connect(address, cluster))
    except (ConnectionError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        yield client
    except (redis.RedisError, GcsUnavailableError) as exc:
        raise click.ClickException(f"Redis: {exc}") from None
    finally:
        client.gcs.close()


def _queue_name(queue: str) -> str:
    try:
        check_queue_name(queue)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="QUEUE") from None
    return queue


def _table(rows: list[tuple[str, dict[str, int]]]) -> str:
    header = ("queue", *COLUMNS)
    body = [(name, *(str(stats[c]) for c in COLUMNS)) for name, stats in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *body]
    )


@click.group("queue")
def queue_cli() -> None:
    """Inspect and operate durable queues."""


@queue_cli.command("list")
@address_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_queues(address: str | None, cluster: str | None, as_json: bool) -> None:
    """Every queue with its depth, in-flight, delayed, failed (dead-lettered) and live
    consumer counts."""
    with _client(address, cluster) as client:
        rows = [(name, client.stats(name)) for name in client.queue_names()]
    if as_json:
        click.echo(json.dumps(dict(rows)))
    elif not rows:
        click.echo("No queues.")
    else:
        click.echo(_table(rows))


@queue_cli.command("inspect")
@click.argument("queue")
@address_options
def inspect_queue(queue: str, address: str | None, cluster: str | None) -> None:
    """One queue's counts, its live consumers and its oldest dead-lettered jobs."""
    queue = _queue_name(queue)
    with _client(address, cluster) as client:
        stats = client.stats(queue)
        consumers = client.consumers(queue)
        dead = client.dead_letters(queue, 10)
    click.echo(_table([(queue, stats)]))
    click.echo(f"\nConsumers ({len(consumers)}):")
    for name, info in sorted(consumers.items()):
        click.echo(f"  {name}  pid {info.get('pid')}  host {info.get('host')}")
    click.echo(f"\nDead letters (oldest {len(dead)} of {stats['failed']}):")
    for entry in dead:
        click.echo(f"  {entry.get('id')}  {entry.get('name')}  {entry.get('error')}")


@queue_cli.command("purge")
@click.argument("queue")
@address_options
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def purge_queue(queue: str, address: str | None, cluster: str | None, yes: bool) -> None:
    """Drop the jobs waiting in QUEUE (running jobs finish)."""
    queue = _queue_name(queue)
    if not yes:
        click.confirm(f"Drop every job waiting in {queue!r}?", abort=True)
    with _client(address, cluster) as client:
        dropped = client.purge(queue)
    click.echo(f"Purged {dropped} jobs from {queue}.")


@queue_cli.command("dlq")
@click.argument("queue")
@address_options
@click.option("--count", default=100, show_default=True, help="How many to show.")
def dead_letters(queue: str, address: str | None, cluster: str | None, count: int) -> None:
    """The jobs of QUEUE that failed for good (oldest first)."""
    queue = _queue_name(queue)
    with _client(address, cluster) as client:
        dead = client.dead_letters(queue, count)
    if not dead:
        click.echo(f"No dead-lettered jobs in {queue}.")
    for entry in dead:
        click.echo(f"{entry.get('id')}  {entry.get('name')}  {entry.get('error')}")


@queue_cli.command("retry-dlq")
@click.argument("queue")
@address_options
@click.option("--count", default=1000, show_default=True, help="At most this many.")
def retry_dead_letters(queue: str, address: str | None, cluster: str | None, count: int) -> None:
    """Put QUEUE's dead-lettered jobs back on it (their retries start again)."""
    queue = _queue_name(queue)
    with _client(address, cluster) as client:
        moved = client.redrive(queue, count)
    click.echo(f"Re-queued {moved} dead-lettered jobs on {queue}.")
