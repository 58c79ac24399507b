"""`redray job submit|status|logs|stop|list|delete`: Ray's job CLI on a redray cluster.

`submit` without `--no-wait` streams the job's output and exits with 0 if the job
succeeded, 1 otherwise; errors are one line on stderr with a non-zero status.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from redray.jobs.sdk import JobStatus, JobSubmissionClient

_address = click.option(
    "--address",
    default=None,
    help="The cluster's Redis address (redis://:PASSWORD@HOST:PORT), or 'auto' "
    "(default: RAY_ADDRESS / REDRAY_ADDRESS, else the cluster running on this machine).",
)
_cluster = click.option(
    "--cluster", default=None, help="Cluster name in that Redis (default: 'default')."
)


def _client(address: str | None, cluster: str | None) -> JobSubmissionClient:
    if cluster:
        os.environ["REDRAY_CLUSTER"] = cluster
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:  # redis errors: unreachable, refused credentials
        raise click.ClickException(f"Could not reach the cluster: {exc}") from None


def _calling(fn: Callable[[], Any]) -> Any:
    """fn(), with the errors users cause shown as one line."""
    try:
        return fn()
    except (RuntimeError, ValueError, TypeError) as exc:
        raise click.ClickException(str(exc)) from None


def _json_option(text: str | None, what: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint=what) from None


def _runtime_env(file: str | None, text: str | None, working_dir: str | None) -> dict | None:
    if file and text:
        raise click.UsageError("Give --runtime-env or --runtime-env-json, not both.")
    env = _json_option(text, "--runtime-env-json")
    if file:
        content = Path(file).read_text()
        try:
            env = json.loads(content)
        except json.JSONDecodeError:
            try:
                import yaml
            except ImportError:
                raise click.BadParameter(
                    "not JSON (YAML needs the pyyaml package)", param_hint="--runtime-env"
                ) from None
            env = yaml.safe_load(content)
    if working_dir:
        env = {**(env or {}), "working_dir": working_dir}
    return env


@click.group("job")
def job_cli() -> None:
    """Submit, follow and stop jobs on a redray cluster."""


@job_cli.command("submit", context_settings={"ignore_unknown_options": True})
@_address
@_cluster
@click.option("--job-id", default=None, help="Deprecated: use --submission-id.")
@click.option("--submission-id", default=None, help="The job's id (default: a new one).")
@click.option("--runtime-env", default=None, type=click.Path(exists=True, dir_okay=False))
@click.option("--runtime-env-json", default=None, help="The runtime_env as JSON.")
@click.option("--working-dir", default=None, help="A local directory (or .zip) to run in.")
@click.option("--metadata-json", default=None, help="Metadata of the job, as JSON.")
@click.option("--entrypoint-num-cpus", type=float, default=None)
@click.option("--entrypoint-num-gpus", type=float, default=None)
@click.option("--entrypoint-memory", type=int, default=None)
@click.option("--entrypoint-resources", default=None, help="Custom resources, as JSON.")
@click.option("--no-wait", is_flag=True, help="Return once submitted, without following.")
@click.argument("entrypoint", nargs=-1, required=True, type=click.UNPROCESSED)
def submit(
    address,
    cluster,
    job_id,
    submission_id,
    runtime_env,
    runtime_env_json,
    working_dir,
    metadata_json,
    entrypoint_num_cpus,
    entrypoint_num_gpus,
    entrypoint_memory,
    entrypoint_resources,
    no_wait,
    entrypoint,
) -> None:
    """Queue ENTRYPOINT (after --) as a job; without --no-wait, follow it to its end."""
    env = _runtime_env(runtime_env, runtime_env_json, working_dir)
    client = _client(address, cluster)
    sid = _calling(
        lambda: client.submit_job(
            entrypoint=" ".join(entrypoint),
            submission_id=submission_id or job_id,
            runtime_env=env,
            metadata=_json_option(metadata_json, "--metadata-json"),
            entrypoint_num_cpus=entrypoint_num_cpus,
            entrypoint_num_gpus=entrypoint_num_gpus,
            entrypoint_memory=entrypoint_memory,
            entrypoint_resources=_json_option(entrypoint_resources, "--entrypoint-resources"),
        )
    )
    click.echo(f"Job '{sid}' submitted successfully", err=True)
    if no_wait:
        click.echo(f"Query its status with: redray job status {sid}", err=True)
        click.echo(f"Follow its logs with:  redray job logs -f {sid}", err=True)
        click.echo(f"Stop it with:          redray job stop {sid}", err=True)
        return
    for chunk in client.follow_logs(sid):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    info = client.get_job_info(sid)
    click.echo(f"Job '{sid}' {info.status}: {info.message}", err=True)
    sys.exit(0 if info.status == JobStatus.SUCCEEDED else 1)


@job_cli.command("status")
@_address
@_cluster
@click.argument("job_id")
def status(address, cluster, job_id) -> None:
    """Print a job's status and message."""
    info = _calling(lambda: _client(address, cluster).get_job_info(job_id))
    click.echo(f"Status for job '{job_id}': {info.status}")
    click.echo(f"Status message: {info.message}")


@job_cli.command("logs")
@_address
@_cluster
@click.option("--follow", "-f", is_flag=True, help="Keep printing output until the job ends.")
@click.argument("job_id")
def logs(address, cluster, job_id, follow) -> None:
    """Print a job's output (from any machine)."""
    client = _client(address, cluster)
    if not follow:
        sys.stdout.write(_calling(lambda: client.get_job_logs(job_id)))
        return
    chunks = _calling(lambda: client.follow_logs(job_id))
    for chunk in chunks:
        sys.stdout.write(chunk)
        sys.stdout.flush()


@job_cli.command("stop")
@_address
@_cluster
@click.option("--no-wait", is_flag=True, help="Return without waiting for the job to end.")
@click.argument("job_id")
def stop(address, cluster, job_id, no_wait) -> None:
    """Stop a job at any state: a pending one never starts, a running one's process group
    gets SIGTERM, then SIGKILL."""
    client = _client(address, cluster)
    if not _calling(lambda: client.stop_job(job_id)):
        click.echo(f"Job '{job_id}' has already ended.")
        return
    click.echo(f"Stop requested for job '{job_id}'.")
    if no_wait:
        return
    while not client.get_job_status(job_id).is_terminal():
        time.sleep(0.1)
    click.echo(f"Job '{job_id}' {client.get_job_status(job_id)}.")


@job_cli.command("list")
@_address
@_cluster
def list_jobs(address, cluster) -> None:
    """List the jobs kept in the cluster, oldest first."""
    for info in _client(address, cluster).list_jobs():
        click.echo(f"{info.submission_id}\t{info.status}\t{info.entrypoint}")


@job_cli.command("delete")
@_address
@_cluster
@click.argument("job_id")
def delete(address, cluster, job_id) -> None:
    """Forget a finished job and its logs."""
    _calling(lambda: _client(address, cluster).delete_job(job_id))
    click.echo(f"Job '{job_id}' deleted successfully")
