"""Job submission on a real two-node cluster: the SDK (Ray's names), the `redray job` CLI,
the FIFO queue, stopping at any state, logs from Redis, runtime envs of jobs.

The cluster: a head (1 CPU) and a second node (1 CPU and one unit of "gate", a resource
that lets a test hold the queue with one job).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, wait_for
from test_multinode import LocalCluster

import redray
from redray.job_submission import JobStatus, JobSubmissionClient

STOP_GRACE = "1"  # seconds between SIGTERM and SIGKILL on stop (Ray's default is 3)

DRIVER = """
import json, os, sys
import redray
import projmod
from redray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

redray.init()
print("driver on", os.environ["REDRAY_JOB_SUBMISSION_ID"], flush=True)

@redray.remote
def where():
    import projmod
    with open("data/input.txt") as f:
        return redray.get_runtime_context().get_node_id(), projmod.double(int(f.read()))

nodes = [n["NodeID"] for n in redray.nodes() if n["Alive"]]
refs = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote()
        for n in nodes]
print("RESULT " + json.dumps(redray.get(refs)), flush=True)
"""


@pytest.fixture(scope="module")
def cluster():
    saved = os.environ.get("REDRAY_JOB_STOP_WAIT_TIME_S")
    os.environ["REDRAY_JOB_STOP_WAIT_TIME_S"] = STOP_GRACE
    cluster = LocalCluster()
    try:
        cluster.add_node("127.0.0.1", 1, head=True)
        cluster.add_node("127.0.0.2", 1, resources={"gate": 1})
        cluster.wait_nodes(2)
        yield cluster
    finally:
        if saved is None:
            os.environ.pop("REDRAY_JOB_STOP_WAIT_TIME_S", None)
        else:
            os.environ["REDRAY_JOB_STOP_WAIT_TIME_S"] = saved
        cluster.shutdown()


@pytest.fixture(scope="module")
def client(cluster):
    client = JobSubmissionClient(cluster.url)
    yield client
    client.close()


def run_cli(cluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "REDRAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "redray.cli", "job", args[0], "--address", cluster.url, *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def wait_status(client, sid: str, *statuses: JobStatus, timeout: float = 30) -> JobStatus:
    return wait_for(
        lambda: client.get_job_status(sid) in statuses and client.get_job_status(sid),
        timeout,
        message=f"job {sid} never reached {statuses}: {client.get_job_info(sid)}",
    )


def python(code: str) -> str:
    return f"{sys.executable} -c {shlex.quote(code)}"


def test_job_with_a_working_dir_runs_tasks_on_both_nodes_via_the_cli(cluster, tmp_path):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "projmod.py").write_text("def double(x):\n    return 2 * x\n")
    (project / "data" / "input.txt").write_text("21")
    (project / "driver.py").write_text(DRIVER)
    (project / ".gitignore").write_text("*.secret\n")
    (project / "token.secret").write_text("never shipped")

    done = run_cli(cluster, "submit", "--working-dir", str(project), "--", "python driver.py")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "driver on raysubmit_" in done.stdout  # the output was streamed to the submitter
    result = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
    node_ids = {n["node_id"] for n in cluster.alive_nodes()}
    assert {node for node, _ in result} == node_ids  # tasks ran (and imported) on both nodes
    assert [value for _, value in result] == [42, 42]
    assert "SUCCEEDED" in done.stderr


def test_submit_exit_code_follows_the_job_and_failure_keeps_the_output(cluster, client):
    failed = run_cli(cluster, "submit", "--", "echo about to fail; exit 7")
    assert failed.returncode == 1 and "about to fail" in failed.stdout
    sid = failed.stderr.split("'")[1]
    info = client.get_job_info(sid)
    assert info.status == JobStatus.FAILED and info.driver_exit_code == 7
    assert "exit code 7" in info.message and "about to fail" in info.message


def test_no_wait_then_status_and_logs_from_the_cli(cluster, client):
    submitted = run_cli(cluster, "submit", "--no-wait", "--", "echo line-one; echo line-two")
    assert submitted.returncode == 0, submitted.stderr
    sid = submitted.stderr.split("'")[1]
    wait_status(client, sid, JobStatus.SUCCEEDED)
    status = run_cli(cluster, "status", sid)
    assert "SUCCEEDED" in status.stdout
    logs = run_cli(cluster, "logs", sid)
    assert logs.stdout == "line-one\nline-two\n"

    async def tail() -> str:
        return "".join([chunk async for chunk in client.tail_job_logs(sid)])

    assert asyncio.run(tail()) == "line-one\nline-two\n"  # Ray's async iterator
    listed = run_cli(cluster, "list")
    assert f"{sid}\tSUCCEEDED" in listed.stdout
    assert run_cli(cluster, "delete", sid).returncode == 0
    with pytest.raises(RuntimeError, match="does not exist"):
        client.get_job_status(sid)


def test_logs_stream_while_the_job_runs(client, tmp_path):
    release = tmp_path / "release"
    code = (
        "import os, time\n"
        "print('first line', flush=True)\n"
        f"while not os.path.exists({str(release)!r}): time.sleep(0.01)\n"
        "print('last line', flush=True)\n"
    )
    sid = client.submit_job(entrypoint=python(code))
    chunks = client.follow_logs(sid)
    seen = ""
    while "first line\n" not in seen:  # (output is a byte stream: chunks split anywhere)
        seen += next(chunks)
    assert client.get_job_status(sid) == JobStatus.RUNNING
    release.touch()
    assert seen + "".join(chunks) == "first line\nlast line\n"  # it ends with the job
    assert client.get_job_status(sid) == JobStatus.SUCCEEDED


def test_stop_a_running_job_ends_its_whole_process_group(client, tmp_path):
    pid_file = tmp_path / "child.pid"
    # The child ignores SIGTERM: only the SIGKILL after the grace period ends it.
    entrypoint = (
        f"sh -c 'trap \"\" TERM; echo $$ > {pid_file}; while true; do sleep 0.1; done' & wait"
    )
    sid = client.submit_job(entrypoint=entrypoint)
    wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 30)
    child = int(pid_file.read_text())
    assert client.stop_job(sid)
    assert wait_status(client, sid, JobStatus.STOPPED, JobStatus.FAILED) == JobStatus.STOPPED
    wait_for(lambda: not _alive(child), 10, message="the job's child outlived the stop")
    assert not client.stop_job(sid)  # already ended


def test_stop_a_pending_job_and_pending_jobs_run_in_order(client, tmp_path):
    release = tmp_path / "release"
    order = tmp_path / "order"
    blocker = client.submit_job(
        entrypoint=python(
            f"import os, time\nwhile not os.path.exists({str(release)!r}): time.sleep(0.01)"
        ),
        entrypoint_resources={"gate": 1},
    )
    wait_status(client, blocker, JobStatus.RUNNING)
    queued = [
        client.submit_job(entrypoint=f"echo {i} >> {order}", entrypoint_resources={"gate": 1})
        for i in range(6)
    ]
    assert {client.get_job_status(sid) for sid in queued} == {JobStatus.PENDING}
    assert client.stop_job(queued[2])
    assert client.get_job_status(queued[2]) == JobStatus.STOPPED
    release.touch()
    for sid in queued[3:]:
        wait_status(client, sid, JobStatus.SUCCEEDED)
    assert order.read_text().split() == ["0", "1", "3", "4", "5"]  # FIFO; the stopped one never ran
    assert client.get_job_info(queued[2]).message == "Job was stopped before it started."


@pytest.mark.timeout(120)
def test_200_submissions_at_once_all_finish_two_at_a_time(client):
    count = 200
    started = time.monotonic()
    sids = [
        client.submit_job(entrypoint=f"echo job {i}", entrypoint_num_cpus=1) for i in range(count)
    ]
    for sid in sids:
        wait_status(client, sid, JobStatus.SUCCEEDED, timeout=60)
    elapsed = time.monotonic() - started
    print(f"{count} jobs on 2 CPUs: {elapsed:.2f} s")
    assert [client.get_job_logs(sid) for sid in sids] == [f"job {i}\n" for i in range(count)]
    # Two CPUs, one per entrypoint: never more than two ran at once.
    spans = sorted((i.start_time, i.end_time) for i in map(client.get_job_info, sids))
    for index, (start, _) in enumerate(spans):
        assert sum(1 for s, e in spans[: index + 1] if e > start) <= 2


def test_a_job_whose_pip_install_fails_reports_the_installer_output(client):
    sid = client.submit_job(
        entrypoint="echo should not run",
        runtime_env={"pip": ["--no-index", "redray-no-such-package-anywhere"]},
    )
    wait_status(client, sid, JobStatus.FAILED, timeout=60)
    message = client.get_job_info(sid).message
    assert "runtime_env setup failed" in message and "No matching distribution" in message
    assert "should not run" not in client.get_job_logs(sid)


def test_bad_submissions_are_refused_at_the_call(client, cluster, tmp_path):
    with pytest.raises(ValueError):
        client.submit_job(entrypoint="")
    with pytest.raises(ValueError):
        client.submit_job(entrypoint="true", entrypoint_num_cpus=-1)
    sid = client.submit_job(entrypoint="true", submission_id="fixed-id")
    with pytest.raises(ValueError, match="already exists"):
        client.submit_job(entrypoint="true", submission_id=sid)
    with pytest.raises(ValueError, match="does not exist"):
        client.submit_job(entrypoint="true", runtime_env={"working_dir": str(tmp_path / "x")})
    refused = run_cli(cluster, "status", "no-such-job")
    assert refused.returncode != 0 and "does not exist" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.timeout(60)
def test_a_job_whose_node_dies_fails_with_the_reason_and_its_processes_end(
    cluster, client, tmp_path
):
    """A SIGKILLed raylet runs no cleanup: the job's whole process group (here a shell and
    a child it started) still ends with it, and the job is FAILED naming the dead node."""
    doomed = cluster.add_node("127.0.0.3", 0, resources={"doomed": 1})
    cluster.wait_nodes(3)
    pid_file = tmp_path / "pids"
    sid = client.submit_job(
        entrypoint=f"sleep 60 & echo $$ $! > {pid_file}; wait",
        entrypoint_resources={"doomed": 1},
    )
    pids: list[int] = []
    try:
        wait_for(lambda: pid_file.exists() and len(pid_file.read_text().split()) == 2, 30)
        pids = [int(p) for p in pid_file.read_text().split()]
        os.kill(doomed.process.pid, signal.SIGKILL)
        wait_for(
            lambda: not any(_alive(p) for p in pids),
            10,
            message="the job's processes outlived their SIGKILLed raylet",
        )
        wait_status(client, sid, JobStatus.FAILED, timeout=30)
        info = client.get_job_info(sid)
        assert info.driver_node_id == doomed.info["node_id"] and "died" in info.message
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie not reaped yet counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_public_paths_are_rays():
    import redray.job_submission as module

    assert module.JobStatus.PENDING.is_terminal() is False
    assert {s.value for s in module.JobStatus} == {
        "PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED"
    }  # fmt: skip
    assert redray.job_submission.JobSubmissionClient is JobSubmissionClient
