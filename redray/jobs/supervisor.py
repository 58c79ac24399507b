"""A node's side of submitted jobs: run the entrypoints the leader gives this node.

Each job runs as `/bin/sh -c ENTRYPOINT` in a session (process group) of its own, in its
runtime env (working_dir as cwd, py_modules on PYTHONPATH, a virtualenv's bin first on PATH),
with the cluster's address in REDRAY_ADDRESS so its driver connects by itself, to this node.
While it runs, its entrypoint resources are taken from the node (tasks wait for them); its
output goes to Redis in chunks as it comes; a stop request ends the whole group (SIGTERM, then
SIGKILL after STOP_GRACE_SECONDS). One thread takes jobs from the node's intake list; each
job has a thread that supervises it and one that forwards its output.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from redray.exceptions import RuntimeEnvSetupError
from redray.gcs import Gcs
from redray.jobs.keys import LOG_CHUNK_BYTES, JobKeys
from redray.runtime_env import packaging
from redray.runtime_env import spec as env_spec
from redray.runtime_env.node import NodeEnvs, Prepared
from redray.watcher import is_connection_error

log = logging.getLogger(__name__)

INTAKE_WAIT_SECONDS = 1.0
STOP_POLL_SECONDS = 0.2
STOP_GRACE_SECONDS = float(os.environ.get("REDRAY_JOB_STOP_WAIT_TIME_S", "3"))  # Ray's name
OUTPUT_DRAIN_SECONDS = 2.0  # after the entrypoint exits, for its output to reach Redis
FAILURE_LOG_CHARS = 20_000  # the end of the output quoted in a failed job's message
# Variables of this node's own processes that a job's driver must not inherit.
_NOT_INHERITED = ("REDRAY_WORKER", packaging.WORKER_ENV_VAR)


class JobSupervisor:
    """Runs this node's jobs. `hold`/`release` take and give back resources on the raylet."""

    def __init__(
        self,
        node_id: str,
        gcs_url: str,
        cluster: str,
        envs: NodeEnvs,
        hold: Callable[[dict[str, float]], None],
        release: Callable[[dict[str, float]], None],
    ):
        self.node_id = node_id
        self.gcs_url = gcs_url
        self.cluster = cluster
        self.keys = JobKeys(Gcs(gcs_url, cluster))
        self.envs = envs
        self.hold = hold
        self.release = release
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._groups: dict[str, subprocess.Popen] = {}  # running jobs (guarded by _lock)

    def start(self) -> None:
        threading.Thread(target=self._intake, daemon=True, name="job-intake").start()

    def stop(self) -> None:
        """The node stops: its jobs' process groups are killed and the jobs marked failed."""
        self.stopping.set()
        with self._lock:
            groups = dict(self._groups)
        for process in groups.values():
            _signal_group(process, signal.SIGKILL)
        for sid in groups:
            try:
                self.keys.finish(sid, "FAILED", f"The node {self.node_id} running the job stopped.")
            except Exception:
                pass

    def _intake(self) -> None:
        failing = False
        while not self.stopping.is_set():
            try:
                sid = self.keys.take_assigned(self.node_id, INTAKE_WAIT_SECONDS)
                failing = False
            except Exception as exc:
                if not failing and not self.stopping.is_set():
                    log.warning("taking jobs from Redis failed (%s); retrying", exc)
                failing = True
                self.stopping.wait(INTAKE_WAIT_SECONDS)
                continue
            if sid is not None:
                threading.Thread(target=self._run, args=(sid,), daemon=True, name="job").start()

    # -- one job ----------------------------------------------------------------------------
    def _run(self, sid: str) -> None:
        try:
            job = self.keys.job(sid)
            if job is None:
                return
            resources = job.get("entrypoint_resources") or {}
            self.hold(resources)
            try:
                self._run_held(sid, job)
            finally:
                self.release(resources)
        except Exception as exc:
            log.exception("supervising job %s failed", sid)
            try:
                self.keys.finish(sid, "FAILED", f"The job supervisor failed: {exc!r}")
            except Exception as again:
                if not is_connection_error(again):
                    log.exception("recording the failure of job %s failed", sid)

    def _run_held(self, sid: str, job: dict[str, Any]) -> None:
        runtime_env = job.get("runtime_env") or {}
        prepared = Prepared()
        if env_spec.needs_setup(runtime_env):
            try:
                prepared = self.envs.prepare_blocking(runtime_env)
            except RuntimeEnvSetupError as exc:
                message = f"runtime_env setup failed: {exc}"
                self.keys.append_log(sid, (message + "\n").encode())
                self.keys.finish(sid, "FAILED", message)
                return
        if not self.keys.start(sid, self.node_id):
            return  # stopped while it waited
        process = subprocess.Popen(
            ["/bin/sh", "-c", job["entrypoint"]],
            cwd=prepared.cwd or os.getcwd(),
            env=self._environ(sid, runtime_env, prepared),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        watchdog = _watch_group(process)
        with self._lock:
            self._groups[sid] = process
        tail: list[bytes] = []
        pump = threading.Thread(
            target=self._forward_output, args=(sid, process, tail), daemon=True, name="job-log"
        )
        pump.start()
        stopped = False
        try:
            while process.poll() is None:
                try:
                    process.wait(STOP_POLL_SECONDS)
                except subprocess.TimeoutExpired:
                    pass
                if self.stopping.is_set():
                    return
                if not stopped and process.poll() is None and self._stop_requested(sid):
                    stopped = True
                    self._end_group(process)
        finally:
            with self._lock:
                self._groups.pop(sid, None)
            _dismiss(watchdog)
        pump.join(OUTPUT_DRAIN_SECONDS)
        code = process.returncode
        if stopped:
            self.keys.finish(sid, "STOPPED", "Job was intentionally stopped.", code)
        elif code == 0:
            self.keys.finish(sid, "SUCCEEDED", "Job finished successfully.", code)
        else:
            output = b"".join(tail).decode(errors="replace")[-FAILURE_LOG_CHARS:]
            self.keys.finish(
                sid,
                "FAILED",
                f"Job entrypoint command failed with exit code {code}, last available logs "
                f"(truncated to {FAILURE_LOG_CHARS} chars):\n{output}",
                code,
            )

    def _stop_requested(self, sid: str) -> bool:
        try:
            return self.keys.stop_requested(sid)
        except Exception:
            return False  # Redis away: asked again at the next poll

    def _end_group(self, process: subprocess.Popen) -> None:
        """SIGTERM the job's process group, SIGKILL it if still there after the grace."""
        _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < deadline and _group_alive(process):
            time.sleep(0.05)
        _signal_group(process, signal.SIGKILL)

    def _environ(self, sid: str, runtime_env: dict, prepared: Prepared) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
        env = prepared.environ(env)
        env.update(runtime_env.get("env_vars") or {})
        env.update(
            REDRAY_ADDRESS=self.gcs_url,
            REDRAY_CLUSTER=self.cluster,
            REDRAY_NODE_ID=self.node_id,
            REDRAY_JOB_SUBMISSION_ID=sid,
            RAY_JOB_SUBMISSION_ID=sid,
            PYTHONUNBUFFERED="1",
        )
        env.pop("RAY_ADDRESS", None)
        if runtime_env:
            env[packaging.JOB_ENV_VAR] = json.dumps(runtime_env)
        return env

    def _forward_output(self, sid: str, process: subprocess.Popen, tail: list[bytes]) -> None:
        """Send the job's output to Redis as it comes, keeping the last bytes for its
        failure message."""
        kept = 0
        fd = process.stdout.fileno()
        try:
            while True:
                data = os.read(fd, LOG_CHUNK_BYTES)
                if not data:
                    return
                tail.append(data)
                kept += len(data)
                while kept - len(tail[0]) > FAILURE_LOG_CHARS:
                    kept -= len(tail.pop(0))
                try:
                    self.keys.append_log(sid, data)
                except Exception as exc:
                    log.warning("job %s: output lost (%s)", sid, exc)
        finally:
            process.stdout.close()


def _watch_group(process: subprocess.Popen) -> subprocess.Popen | None:
    """A tiny process that SIGKILLs the job's process group once this raylet is gone (a
    SIGKILLed raylet runs no cleanup): it reads a pipe only this process holds open, and
    the pipe's end is the raylet's death. None if it cannot start (the job runs anyway)."""
    try:
        return subprocess.Popen(
            ["/bin/sh", "-c", f"read _; kill -s KILL -- -{process.pid} 2>/dev/null"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError:
        log.warning("no watchdog for job process group %d", process.pid, exc_info=True)
        return None


def _dismiss(watchdog: subprocess.Popen | None) -> None:
    """The job ended under supervision: its watchdog goes without killing anything (the
    group id may be reused once its processes are gone)."""
    if watchdog is None:
        return
    watchdog.kill()
    watchdog.wait()
    if watchdog.stdin is not None:
        watchdog.stdin.close()


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(process: subprocess.Popen) -> bool:
    process.poll()  # reap the leader if it exited
    try:
        os.killpg(process.pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False
