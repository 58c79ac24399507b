"""`redray dashboard-token`: the cluster token a dashboard bound beyond loopback asks for.
Its own module: it needs the state client, which `redray start` (using dashboard/cli.py for
its options) does not."""

from __future__ import annotations

import click

from redray.state.client import RayStateApiException, connect


@click.command("dashboard-token")
@click.option(
    "--address",
    default="auto",
    show_default=True,
    metavar="URL",
    help='The cluster\'s Redis URL, or "auto" for the one `redray start` runs here.',
)
@click.option("--cluster", default=None, help="Cluster name (default: the recorded one).")
def dashboard_token(address: str, cluster: str | None) -> None:
    """Print the cluster token a dashboard bound beyond loopback asks for (anyone who can
    read the cluster's Redis can read it: keep both secret)."""
    try:
        gcs, owned = connect(None if address == "auto" else address, cluster)
    except (RayStateApiException, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        token = gcs.cluster_token()
    finally:
        if owned:
            gcs.close()
    if token is None:
        raise click.ClickException(f"No redray cluster {gcs.cluster!r} in that Redis.")
    click.echo(token.hex())
