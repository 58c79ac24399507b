"""`JobSubmissionClient`: submit, follow and stop jobs with Ray's names and signatures.

The address is the cluster's Redis (`redis://...`, `"auto"` for the cluster `redray start`
runs on this machine, or RAY_ADDRESS/REDRAY_ADDRESS): no other server is needed. A job's
runtime_env is checked and its directories uploaded here, before the job is queued.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import string
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from redray.gcs import DEFAULT_CLUSTER, URL_SCHEMES, Gcs
from redray.jobs.keys import TERMINAL, JobKeys
from redray.node import launch
from redray.runtime_env import packaging
from redray.runtime_env import spec as env_spec

TAIL_POLL_MS = 1000
DASHBOARD_TIMEOUT_SECONDS = 10.0


class JobStatus(str, Enum):
    """The status of a submitted job (as Ray's)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    def __str__(self) -> str:
        return f"{self.value}"

    def is_terminal(self) -> bool:
        """STOPPED, SUCCEEDED and FAILED are final."""
        return self.value in TERMINAL


@dataclass
class JobDetails:
    """What is known of a submitted job (Ray's field names)."""

    submission_id: str
    entrypoint: str
    status: JobStatus
    message: str | None = None
    type: str = "SUBMISSION"
    job_id: str | None = None
    error_type: str | None = None
    start_time: int | None = None  # ms since the epoch, as Ray
    end_time: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    runtime_env: dict[str, Any] = field(default_factory=dict)
    driver_node_id: str | None = None
    driver_exit_code: int | None = None
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    entrypoint_memory: int | None = None
    entrypoint_resources: dict[str, float] | None = None


def _details(job: dict[str, Any]) -> JobDetails:
    def ms(name: str) -> int | None:
        value = job.get(name)
        return int(float(value) * 1000) if value else None

    code = job.get("driver_exit_code")
    return JobDetails(
        submission_id=job["submission_id"],
        entrypoint=job.get("entrypoint", ""),
        status=JobStatus(job["status"]),
        message=job.get("message"),
        start_time=ms("start_time") or ms("submit_time"),
        end_time=ms("end_time"),
        metadata=job.get("metadata") or {},
        runtime_env=job.get("runtime_env") or {},
        driver_node_id=job.get("node_id"),
        driver_exit_code=int(code) if code not in (None, "") else None,
        entrypoint_num_cpus=job.get("entrypoint_num_cpus"),
        entrypoint_num_gpus=job.get("entrypoint_num_gpus"),
        entrypoint_memory=job.get("entrypoint_memory"),
        entrypoint_resources=job.get("entrypoint_extra_resources"),
        error_type="JOB_ENTRYPOINT_COMMAND_ERROR" if job.get("status") == "FAILED" else None,
    )


def resolve_address(address: str | None, headers: dict[str, Any] | None = None) -> tuple[str, str]:
    """(Redis URL, cluster name) of an address: a Redis URL, "auto", None (RAY_ADDRESS /
    REDRAY_ADDRESS, else "auto"), or the cluster's dashboard (http://HOST:PORT)."""
    address = address or os.environ.get("REDRAY_ADDRESS") or os.environ.get("RAY_ADDRESS")
    cluster = os.environ.get("REDRAY_CLUSTER") or DEFAULT_CLUSTER
    if address in (None, "auto"):
        current = launch.read_current_cluster()
        if current is None:
            raise ConnectionError(
                "Could not find any running redray cluster on this machine: pass the "
                "cluster's Redis address (redis://:PASSWORD@HOST:PORT) or start one with "
                "`redray start --head`."
            )
        return current["gcs_url"], current.get("cluster", DEFAULT_CLUSTER)
    if address.startswith(("http://", "https://")):
        return _address_from_dashboard(address, headers or {})
    if not address.startswith(URL_SCHEMES):
        address = "redis://" + address
    return address, cluster


def _address_from_dashboard(url: str, headers: dict[str, Any]) -> tuple[str, str]:
    """The Redis URL behind a dashboard, asked of it. It holds the Redis password, so the
    dashboard wants the cluster token: headers={"Authorization": "Bearer <token>"} (printed
    by `redray dashboard-token`). Passing the Redis address (or "auto") needs no token."""
    request = urllib.request.Request(
        url.rstrip("/") + "/api/cluster_address",
        headers={str(k): str(v) for k, v in headers.items()},
    )
    try:
        with urllib.request.urlopen(request, timeout=DASHBOARD_TIMEOUT_SECONDS) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise ConnectionError(
                f"The dashboard at {url} asks for the cluster token: pass "
                'headers={"Authorization": "Bearer <token>"} (`redray dashboard-token` '
                "prints it), or the cluster's Redis address."
            ) from None
        raise ConnectionError(f"The dashboard at {url} answered {exc.code}.") from None
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"Could not reach the dashboard at {url}: {exc}") from None
    return answer["address"], answer["cluster"]


def new_submission_id() -> str:
    alphabet = string.ascii_letters + string.digits
    return "raysubmit_" + "".join(secrets.choice(alphabet) for _ in range(16))


class JobSubmissionClient:
    """Submits jobs to a redray cluster and follows them (Ray's `JobSubmissionClient`)."""

    def __init__(
        self,
        address: str | None = None,
        create_cluster_if_needed: bool = False,
        cookies: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        headers: dict[str, Any] | None = None,
        verify: str | bool | None = True,
    ):
        url, cluster = resolve_address(address, headers)
        self._gcs = Gcs(url, cluster)
        if self._gcs.cluster_token() is None:
            self._gcs.close()
            raise ConnectionError(f"No redray cluster {cluster!r} is registered at {url}.")
        self._keys = JobKeys(self._gcs)
        self._default_metadata = dict(metadata or {})

    def close(self) -> None:
        self._gcs.close()

    def submit_job(
        self,
        *,
        entrypoint: str,
        job_id: str | None = None,
        runtime_env: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
        submission_id: str | None = None,
        entrypoint_num_cpus: int | float | None = None,
        entrypoint_num_gpus: int | float | None = None,
        entrypoint_memory: int | None = None,
        entrypoint_resources: dict[str, float] | None = None,
        entrypoint_label_selector: dict[str, str] | None = None,
    ) -> str:
        """Queue a job; its submission id. The runtime_env's directories are uploaded now
        (ValueError when one is over the size limit, naming its largest files)."""
        if not isinstance(entrypoint, str) or not entrypoint.strip():
            raise ValueError("entrypoint must be a non-empty shell command.")
        if job_id is not None and submission_id is not None and job_id != submission_id:
            raise ValueError("job_id (deprecated) and submission_id must not differ.")
        if entrypoint_label_selector:
            raise ValueError("entrypoint_label_selector is not supported by redray.")
        submission_id = submission_id or job_id or new_submission_id()
        resources = _entrypoint_resources(
            entrypoint_num_cpus, entrypoint_num_gpus, entrypoint_memory, entrypoint_resources
        )
        env_spec.validate(runtime_env)
        resolved = packaging.resolve(runtime_env, self._gcs) or {}
        info = {
            "entrypoint": entrypoint,
            "metadata": {**self._default_metadata, **(metadata or {})},
            "runtime_env": resolved,
            "entrypoint_resources": resources,
            "entrypoint_num_cpus": entrypoint_num_cpus,
            "entrypoint_num_gpus": entrypoint_num_gpus,
            "entrypoint_memory": entrypoint_memory,
            "entrypoint_extra_resources": entrypoint_resources,
        }
        if not self._keys.submit(submission_id, info):
            raise ValueError(f"Job with submission_id {submission_id} already exists.")
        return submission_id

    def _job(self, job_id: str) -> dict[str, Any]:
        job = self._keys.job(job_id)
        if job is None:
            raise RuntimeError(f"Job {job_id} does not exist.")
        return job

    def get_job_status(self, job_id: str) -> JobStatus:
        return JobStatus(self._job(job_id)["status"])

    def get_job_info(self, job_id: str) -> JobDetails:
        return _details(self._job(job_id))

    def list_jobs(self) -> list[JobDetails]:
        return [_details(job) for job in self._keys.jobs()]

    def stop_job(self, job_id: str) -> bool:
        """Stop a job at any state (a pending one never starts); False if it had ended."""
        outcome = self._keys.stop(job_id)
        if outcome == "missing":
            raise RuntimeError(f"Job {job_id} does not exist.")
        return outcome in ("stopped", "stopping")

    def delete_job(self, job_id: str) -> bool:
        """Forget a finished job and its logs (RuntimeError for one not finished)."""
        outcome = self._keys.delete(job_id)
        if outcome == "missing":
            raise RuntimeError(f"Job {job_id} does not exist.")
        if outcome != "deleted":
            raise RuntimeError(
                f"Attempted to delete job '{job_id}', but it is in a non-terminal state {outcome}."
            )
        return True

    def get_job_logs(self, job_id: str) -> str:
        self._job(job_id)
        text, _ = self._keys.read_log(job_id)
        return "".join(text)

    def follow_logs(self, job_id: str, poll_ms: int = TAIL_POLL_MS) -> Iterator[str]:
        """The job's output as it comes, from the start, until the job has ended."""
        self._job(job_id)
        last = "-"
        while True:
            text, last = self._keys.read_log(job_id, last, block_ms=poll_ms)
            yield from text
            if not text and JobStatus(self._job(job_id)["status"]).is_terminal():
                text, last = self._keys.read_log(job_id, last)  # what came meanwhile
                yield from text
                return

    async def tail_job_logs(self, job_id: str) -> AsyncIterator[str]:
        """Ray's async iterator over the job's output until it ends."""
        chunks = self.follow_logs(job_id)
        done = object()
        while True:
            chunk = await asyncio.to_thread(next, chunks, done)
            if chunk is done:
                return
            yield chunk

    def wait_until_finished(self, job_id: str, timeout: float | None = None) -> JobStatus:
        """Poll until the job is final (a redray convenience); its status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.get_job_status(job_id)
            if status.is_terminal():
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"Job {job_id} is still {status} after {timeout} s.")
            time.sleep(0.05)


def _entrypoint_resources(
    num_cpus: float | None, num_gpus: float | None, memory: int | None, extra: dict | None
) -> dict[str, float]:
    """The resources an entrypoint holds while it runs (by default none, as Ray)."""
    resources: dict[str, float] = {}
    for name, value in (("CPU", num_cpus), ("GPU", num_gpus), ("memory", memory)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"entrypoint {name} must be a non-negative number, got {value!r}.")
        if value:
            resources[name] = float(value)
    for name, value in (extra or {}).items():
        if name in ("CPU", "GPU", "memory"):
            raise ValueError(
                f"Use entrypoint_num_cpus/num_gpus/memory rather than entrypoint_resources "
                f"for {name!r}."
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"entrypoint resource {name!r} must be non-negative, got {value!r}.")
        if value:
            resources[name] = float(value)
    return resources
