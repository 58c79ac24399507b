"""The dashboard's and the metrics exporter's options of `redray start` / `redray node`, and
starting them for a node those commands started."""

from __future__ import annotations

import os
from typing import Any

import click

from redray.dashboard import deps
from redray.dashboard import launch as dashboard_launch
from redray.gcs import Gcs

dashboard_options = [
    click.option(
        "--include-dashboard",
        type=bool,
        default=None,
        help="Start the dashboard (web UI, JSON API, /metrics) on the head. Default: only "
        "when --dashboard-host or --dashboard-port is given.",
    ),
    click.option(
        "--dashboard-host",
        default=None,
        help="Address the dashboard listens on (default 127.0.0.1). Any other address "
        "requires the cluster token (login form or `Authorization: Bearer`).",
    ),
    click.option(
        "--dashboard-port",
        type=click.IntRange(0, 65535),
        default=None,
        help=f"The dashboard's port (default {dashboard_launch.DEFAULT_PORT}, or the next "
        "free one; 0: any free port).",
    ),
]

metrics_option = click.option(
    "--metrics-export-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve this node's Prometheus metrics on this port (a process of its own), on the "
    "node's address.",
)


def add_dashboard_options(func: Any) -> Any:
    for option in reversed(dashboard_options):
        func = option(func)
    return func


def wanted(include: bool | None, host: str | None, port: int | None) -> bool:
    """Whether to start the dashboard: as asked, else when a host or port was given."""
    if include is not None:
        return include
    return host is not None or port is not None


def require_extra() -> None:
    """A click error before anything starts when the `dashboard` extra is missing."""
    try:
        deps.check()
    except deps.DashboardDependencyError as exc:
        raise click.ClickException(str(exc)) from None


def start_detached(
    gcs_url: str,
    cluster: str,
    session_dir: str,
    *,
    host: str | None = None,
    port: int | None = None,
    node_id: str | None = None,
) -> dashboard_launch.DashboardProcess:
    """The dashboard (or node_id's exporter) of a node `redray` started: outlives the
    command; the dashboard's URL is recorded in the cluster's KV (init() returns it). Click
    errors for a missing extra or a taken port."""
    try:
        started = dashboard_launch.start(
            gcs_url=gcs_url,
            cluster=cluster,
            host=host or "127.0.0.1",
            port=port,
            log_dir=os.path.join(session_dir, "logs"),
            node_id=node_id,
            detached=True,
        )
    except (deps.DashboardDependencyError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if node_id is None:
        record_url(gcs_url, cluster, started.url)
    return started


def record_url(gcs_url: str, cluster: str, url: str) -> None:
    gcs = Gcs(gcs_url, cluster)
    try:
        dashboard_launch.record_url(gcs, url)
    finally:
        gcs.close()
