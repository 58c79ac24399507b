"""Job context of a core worker: which job the running code belongs to, the functions and
classes its tasks run, and the prints of tasks coming back to their driver.

A process may run tasks of several jobs (a worker serves whichever owner leases it): each
peer is told about a job (`introduce`) before the first task of that job is sent to it.
Functions travel by content hash: the owner that submitted a task serves the function's
pickle itself (no Redis on the task path); the GCS function table is the fallback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redray import exceptions
from redray.core import serialization
from redray.core.peers import Address, Peers
from redray.gcs import Gcs
from redray.runtime_env import packaging
from redray.runtime_env import spec as env_spec
from redray.transport.connection import Connection


@dataclass(frozen=True)
class JobInfo:
    """What every process running a job's tasks needs to know about the job."""

    job_id: str
    driver: Address  # where prints of the job's tasks go
    namespace: str
    log_to_driver: bool = True
    paths: tuple[str, ...] = ()  # the driver's script directory and cwd, importable by tasks
    runtime_env: dict | None = None


class Jobs:
    """The jobs known to one process, their functions, and their drivers' output."""

    def __init__(
        self,
        peers: Peers,
        gcs: Gcs,
        *,
        job_id: str,
        namespace: str,
        log_to_driver: bool,
        prints_here: bool,
    ):
        self._peers = peers
        self._gcs = gcs
        self.job_id = job_id  # this process's own job (a driver's; set by a worker's actor)
        self._namespace = namespace
        self.log_to_driver = log_to_driver
        self._prints_here = prints_here  # a driver prints what its tasks print
        self.jobs: dict[str, JobInfo] = {}
        self._functions: dict[str, Any] = {}
        self._exported: dict[str, bytes] = {}  # functions we exported, served to our workers
        # The task or actor call running on the calling thread (set by the executor).
        self.current_task: Callable[[], Any] = lambda: None
        peers.handle("job", self._on_job)
        peers.handle("get_function", self._on_get_function)
        peers.handle("log", self._on_log)
        peers.handle("warn", self._on_warning)

    # -- jobs -------------------------------------------------------------------------------
    def current(self) -> JobInfo:
        """The job the calling code belongs to (the running task's, or this process's)."""
        ctx = self.current_task()
        if ctx is not None:
            job = self.jobs.get(ctx.job_id)
            if job is not None:
                return job
        job = self.jobs.get(self.job_id)
        if job is None:
            job = JobInfo(self.job_id, self._peers.address, self._namespace, self.log_to_driver)
        return job

    def runtime_env_for(self, runtime_env: dict | None, job: JobInfo) -> dict | None:
        """The resolved runtime env of a task or actor of job: its own merged over the one it
        inherits (Ray's rules), packages uploaded once."""
        merged = env_spec.merge(packaging.inherited_env(job.runtime_env), runtime_env)
        return packaging.resolve_once(merged, self._gcs)

    @property
    def namespace(self) -> str:
        return self.current().namespace

    def introduce(self, conn: Connection, job: JobInfo) -> None:
        """Tell a peer about a job before the first task of that job is sent to it."""
        known = conn.info.get("jobs")
        if known is None:
            known = conn.info["jobs"] = set()
        if job.job_id not in known:
            known.add(job.job_id)
            conn.send(("job", job))

    def _on_job(self, conn: Connection, message: tuple) -> None:
        job = message[1]
        self.jobs[job.job_id] = job

    # -- functions --------------------------------------------------------------------------
    def export_function(self, key: str, blob_factory: Callable[[], bytes]) -> None:
        """Record a function or class in the GCS (once); we also serve it to our workers."""
        if key not in self._exported:
            blob = blob_factory()
            self._gcs.export_function(key, blob, job_id=self.current().job_id)
            self._exported[key] = blob

    def load_function(self, key: str, owner: Connection | None = None) -> Any:
        """A function by key: cached, else from the owner that submitted it (no Redis on the
        task path), else from the GCS function table."""
        fn = self._functions.get(key)
        if fn is None:
            blob = None
            if owner is not None:
                reply = self._peers.call(owner, "get_function", key)
                blob = reply if isinstance(reply, bytes) else None
            if blob is None:
                blob = self._gcs.function(key)
            if blob is None:
                raise exceptions.RaySystemError(f"function {key} was never exported")
            fn = self._functions[key] = serialization.loads_function(blob)
        return fn

    def _on_get_function(self, conn: Connection, message: tuple) -> None:
        _, call_id, key = message
        conn.send(("reply", call_id, self._exported.get(key)))

    # -- output of tasks --------------------------------------------------------------------
    def _on_log(self, conn: Connection, message: tuple) -> None:
        _, entries = message
        if not self._prints_here:
            return
        for stream, prefix, text in entries:
            out = sys.stderr if stream == 2 else sys.stdout
            try:
                out.write("".join(f"{prefix} {line}\n" for line in text.splitlines()))
                out.flush()
            except (ValueError, OSError):
                pass

    def _on_warning(self, conn: Connection, message: tuple) -> None:
        print(message[1], file=sys.stderr, flush=True)
