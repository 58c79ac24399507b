"""`redray queue ...` and `redray worker -A proj` against a real cluster, run as commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import REPO, TESTS_DIR, wait_for
from dq_cluster import QueueCluster

from redray.celery import Celery
from redray.durable import Queue


def failing() -> None:
    raise RuntimeError("always")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    made = QueueCluster(tmp_path_factory.mktemp("cli-redis"), num_cpus=2)
    yield made
    made.shutdown()


def env_for(cluster: QueueCluster) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS_DIR), env.get("PYTHONPATH", "")])
    env["CELERY_PROJ_BROKER"] = cluster.url
    return env


def redray_cli(cluster: QueueCluster, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "redray.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env_for(cluster),
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.timeout(90)
def test_queue_commands_show_and_operate_the_queues(cluster):
    queue = Queue("cli-jobs", heartbeat_ttl=1.0)
    dead = queue.send(failing, max_retries=0)
    consumers = queue.consume(failing, num_consumers=1)
    try:
        with pytest.raises(RuntimeError):
            dead.get(timeout=20)
    finally:
        consumers.stop()
    for i in range(3):
        queue.enqueue("nowhere.run", i)
    queue.send("nowhere.run", countdown=600)

    listed = json.loads(redray_cli(cluster, "queue", "list", "--address", cluster.url, "--json"))
    assert listed["cli-jobs"] == {
        "depth": 3, "in_flight": 0, "delayed": 1, "failed": 1, "consumers": 0
    }  # fmt: skip
    table = redray_cli(cluster, "queue", "list", "--address", cluster.url)
    assert "cli-jobs" in table and "in_flight" in table
    inspected = redray_cli(cluster, "queue", "inspect", "cli-jobs", "--address", cluster.url)
    assert dead.id in inspected and "always" in inspected
    assert dead.id in redray_cli(cluster, "queue", "dlq", "cli-jobs", "--address", cluster.url)
    out = redray_cli(cluster, "queue", "retry-dlq", "cli-jobs", "--address", cluster.url)
    assert "Re-queued 1" in out and dead.state == "PENDING"
    out = redray_cli(cluster, "queue", "purge", "cli-jobs", "--yes", "--address", cluster.url)
    assert "Purged 5 jobs" in out
    assert queue.stats() == {"depth": 0, "in_flight": 0, "delayed": 0, "failed": 0, "consumers": 0}


@pytest.mark.timeout(90)
def test_redray_worker_runs_a_celery_project_until_sigterm(cluster):
    worker = subprocess.Popen(
        [sys.executable, "-m", "redray.cli", "worker", "-A", "celery_proj", "-Q", "celery,emails",
         "-c", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_for(cluster),
        cwd=str(TESTS_DIR),
    )  # fmt: skip
    try:
        line = worker.stdout.readline()
        assert "redray worker: 2 consumer(s) of celery, emails" in line, worker.stderr.read()
        client = Celery("client", broker=cluster.url)
        assert client.send_task("celery_proj.add", (2, 3)).get(timeout=30) == 5
        assert (
            client.send_task("celery_proj.send_email", ("x",), queue="emails").get(timeout=30)
            == "sent to x"
        )
        assert Queue("celery").stats()["consumers"] == 2
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
        wait_for(lambda: Queue("celery").stats()["consumers"] == 0, timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
