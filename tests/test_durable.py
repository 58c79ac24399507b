"""Durable queues (redray/durable/) on a real cluster: a Redis with AOF and a head node; the
consumers are actors in worker processes, killed with SIGKILL by the fault tests.

Jobs leave side effects in files (one line per run: "job_id pid"), which is how the tests
count runs across processes that die."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, wait_for
from dq_cluster import QueueCluster, kill, running

from redray.durable import (
    JobRevokedError,
    JobTimeoutError,
    Queue,
    Retry,
    current_job,
)
from redray.durable.jobs import JobSpec


# -- jobs (importable by the consumers: tests/ is on their PYTHONPATH) ----------------------
def record(path: str, job_id: str) -> None:
    with open(path, "a") as f:
        f.write(f"{job_id} {os.getpid()}\n")


def work(path: str, seconds: float = 0.0) -> int:
    """Record the run, then take `seconds`; returns the pid that ran it."""
    job = current_job()
    record(path + ".start", job.id)
    if seconds:
        time.sleep(seconds)
    record(path, job.id)
    return os.getpid()


def square(x: int) -> int:
    return x * x


def at_time(path: str) -> float:
    now = time.time()
    record(path, current_job().id)
    return now


def always_fails(path: str) -> None:
    record(path, current_job().id)
    if not os.path.exists(path + ".ok"):
        raise ValueError("not yet")


def retry_twice(path: str) -> int:
    job = current_job()
    record(path, job.id)
    if job.retries < 2:
        raise Retry(countdown=0.01)
    return job.retries


def add_parts(results: list, offset: int = 0) -> int:
    return sum(results) + offset


def runs(path: str | Path) -> list[tuple[str, int]]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        job_id, pid = line.split()
        out.append((job_id, int(pid)))
    return out


class Model:
    """A stateful consumer: the instance lives as long as its actor."""

    def __init__(self, start: int):
        self.count = start

    def bump(self, by: int) -> int:
        self.count += by
        return self.count


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    made = QueueCluster(tmp_path_factory.mktemp("dq-redis"))
    yield made
    made.shutdown()


def new_queue(name: str, **settings) -> Queue:
    settings.setdefault("heartbeat_ttl", 1.0)
    return Queue(f"{name}-{os.urandom(3).hex()}", **settings)


# -- basics -----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_jobs_run_results_are_kept_and_a_job_id_enqueues_once(cluster, tmp_path):
    queue = new_queue("basic")
    job = queue.send(square, (7,), job_id="the-one")
    again = queue.send(square, (8,), job_id="the-one")  # de-duplicated: nothing written
    assert job.state == "PENDING"
    consumers = queue.consume(square, num_consumers=1)
    try:
        assert job.get(timeout=20) == 49
        assert again.get(timeout=1) == 49
        assert job.state == "SUCCESS" and job.successful()
        assert int(cluster.gcs.redis.pttl(queue.client.keys.job(job.id))) > 0  # result TTL
        with pytest.raises(JobTimeoutError):
            queue.send(square, (1,), countdown=30).get(timeout=0.2)
    finally:
        consumers.stop()


@pytest.mark.timeout(60)
def test_a_consumer_class_keeps_its_state_across_jobs(cluster):
    queue = new_queue("stateful")
    consumers = queue.consume(Model, num_consumers=1, init_args=(100,))
    try:
        jobs = [queue.enqueue(Model.bump, 1) for _ in range(5)]
        assert [j.get(timeout=20) for j in jobs] == [101, 102, 103, 104, 105]
        assert queue.enqueue("bump", 10).get(timeout=20) == 115
    finally:
        consumers.stop()


@pytest.mark.timeout(60)
def test_retries_then_dead_letter_then_redrive(cluster, tmp_path):
    queue = new_queue("retries")
    path = str(tmp_path / "runs")
    consumers = queue.consume([always_fails, retry_twice], num_consumers=1)
    try:
        job = queue.send(
            always_fails, (path,), autoretry_for=[ValueError], max_retries=2, retry_backoff=0.01
        )
        with pytest.raises(ValueError, match="not yet"):
            job.get(timeout=20)
        assert job.state == "FAILURE"
        assert len(runs(path)) == 3  # the first try and two retries
        dead = queue.dead_letters()
        assert [d["id"] for d in dead] == [job.id] and "not yet" in dead[0]["error"]
        assert queue.stats()["failed"] == 1

        Path(path + ".ok").touch()
        assert queue.redrive() == 1
        assert job.get(timeout=20) is None and len(runs(path)) == 4
        assert queue.stats()["failed"] == 0

        explicit = queue.enqueue(retry_twice, str(tmp_path / "explicit"))
        assert explicit.get(timeout=20) == 2
    finally:
        consumers.stop()


@pytest.mark.timeout(60)
def test_revoked_and_expired_jobs_never_run(cluster, tmp_path):
    queue = new_queue("revoke")
    path = str(tmp_path / "runs")
    delayed = queue.send(work, (path,), countdown=0.3)
    waiting = queue.send(work, (path,))
    expired = queue.send(work, (path,), expires=0.001)
    assert delayed.revoke() and waiting.revoke()
    time.sleep(0.01)  # let `expired` pass its expiry time (a time, not an event)
    consumers = queue.consume(work, num_consumers=1)
    try:
        ran = queue.send(work, (path,), countdown=0.4)
        ran.get(timeout=20)
        for job in (delayed, waiting, expired):
            assert job.state == "REVOKED"
            with pytest.raises(JobRevokedError):
                job.get(timeout=1)
        assert [job_id for job_id, _ in runs(path)] == [ran.id]
        assert not ran.revoke()  # finished: nothing to revoke
    finally:
        consumers.stop()


@pytest.mark.timeout(60)
def test_higher_priorities_first_and_the_queue_rate_limit(cluster, tmp_path):
    queue = new_queue("prio", prefetch=1, rate_limit="10/s")
    path = str(tmp_path / "runs")
    low = [queue.send(work, (path,), priority=9) for _ in range(3)]
    high = [queue.send(work, (path,), priority=0) for _ in range(3)]
    started = time.monotonic()
    consumers = queue.consume(work, num_consumers=1)
    try:
        queue.client.wait([j.id for j in low + high], timeout=20)
        order = [job_id for job_id, _ in runs(path)]
        assert order[:3] == [j.id for j in high] and sorted(order[3:]) == sorted(j.id for j in low)
        burst = [queue.send(work, (path,)) for _ in range(15)]
        queue.client.wait([j.id for j in burst], timeout=20)
        # the bucket holds 10 tokens (one second's worth); 21 jobs need at least 1.1 s
        assert time.monotonic() - started >= 1.0
    finally:
        consumers.stop()


@pytest.mark.timeout(60)
def test_an_eta_job_runs_once_within_100ms_of_its_time(cluster, tmp_path):
    queue = new_queue("eta")
    path = str(tmp_path / "runs")
    consumers = queue.consume(at_time, num_consumers=2)
    try:
        eta = time.time() + 2.0
        job = queue.send(at_time, (path,), eta=eta)
        assert queue.stats()["delayed"] == 1
        ran_at = job.get(timeout=20)
        assert 0 <= ran_at - eta < 0.1, ran_at - eta
        assert len(runs(path)) == 1
    finally:
        consumers.stop()


# -- faults -----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_long_job_is_never_run_twice_while_its_consumer_lives(cluster, tmp_path):
    queue = new_queue("long", heartbeat_ttl=0.5, prefetch=1)
    path = str(tmp_path / "runs")
    consumers = queue.consume(work, num_consumers=2)
    try:
        job = queue.send(work, (path, 1.5))  # 3x the heartbeat TTL, the reclaim idle time
        assert job.get(timeout=20) > 0
        assert len(runs(path + ".start")) == 1
        assert job.info()["deliveries"] == "1"
    finally:
        consumers.stop()


@pytest.mark.timeout(150)
def test_consumers_killed_every_half_second_lose_no_job(cluster, tmp_path):
    jobs_count = 1000
    queue = new_queue("kills", prefetch=2, heartbeat_ttl=1.0)
    path = str(tmp_path / "runs")
    consumers = queue.consume(work, num_consumers=3)
    specs = [queue.spec(work, (path, 0.005)) for _ in range(jobs_count)]
    ids = [s.job_id for s in specs]
    queue.enqueue_many(specs)
    killed: set[int] = set()
    rng = random.Random(7)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if all(s == "SUCCESS" for s in queue.client.states(ids)):
                break
            live = [c["pid"] for c in queue.consumers().values() if running(c["pid"])]
            live = [pid for pid in live if pid not in killed]
            # Never the last live one: restarting a consumer actor can take longer than the
            # kill cadence on a loaded machine, and the test is about losing nothing.
            if len(live) >= 2:
                pid = rng.choice(live)
                if kill(pid):
                    killed.add(pid)
            time.sleep(0.5)  # the kill cadence itself
        states = Counter(queue.client.states(ids))
        assert states == {"SUCCESS": jobs_count}, states
    finally:
        consumers.stop()
    done = Counter(job_id for job_id, _ in runs(path))
    assert set(done) == set(ids)  # every job's side effect is there
    started: dict[str, list[int]] = {}
    for job_id, pid in runs(path + ".start"):
        started.setdefault(job_id, []).append(pid)
    reruns = {job_id: pids for job_id, pids in started.items() if len(pids) > 1}
    for job_id, pids in reruns.items():
        # every run but the last was cut short by the death of its consumer
        assert set(pids[:-1]) <= killed, (job_id, pids, killed)
    print(f"{len(killed)} consumers killed, {len(reruns)} jobs run again")
    assert len(killed) >= 3


DRIVER = """
import os, signal, sys
import redray
from redray.durable import Queue
redray.init(address=sys.argv[1])
queue = Queue(sys.argv[2])
for i in range(int(sys.argv[3])):
    queue.send("test_durable.work", (sys.argv[4],), job_id=f"{sys.argv[2]}-{i}")
print("enqueued", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.timeout(90)
def test_jobs_outlive_the_driver_killed_right_after_enqueueing(cluster, tmp_path):
    jobs_count = 1000
    queue = new_queue("driver")
    path = str(tmp_path / "runs")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ["PYTHONPATH"]]))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DRIVER), cluster.url, queue.name,
         str(jobs_count), path],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL and "enqueued" in proc.stdout, proc.stderr
    consumers = queue.consume(work, num_consumers=2)
    try:
        ids = [f"{queue.name}-{i}" for i in range(jobs_count)]
        queue.client.wait(ids, timeout=60)
        assert Counter(queue.client.states(ids)) == {"SUCCESS": jobs_count}
        assert len({job_id for job_id, _ in runs(path)}) == jobs_count
    finally:
        consumers.stop()


@pytest.mark.timeout(90)
def test_a_redis_restart_mid_run_loses_nothing_and_consumers_resume(cluster, tmp_path):
    jobs_count = 300
    queue = new_queue("restart", prefetch=1)
    path = str(tmp_path / "runs")
    specs = [queue.spec(work, (path, 0.01)) for _ in range(jobs_count)]
    ids = [s.job_id for s in specs]
    queue.enqueue_many(specs)
    consumers = queue.consume(work, num_consumers=2)
    try:
        pids = sorted(consumers.pids())
        wait_for(lambda: len(runs(path)) >= 50, timeout=30)
        cluster.restart_redis()
        queue.client.wait(ids, timeout=60)
        assert Counter(queue.client.states(ids)) == {"SUCCESS": jobs_count}
        assert len({job_id for job_id, _ in runs(path)}) == jobs_count
        assert sorted(consumers.pids()) == pids  # the same consumers, never restarted
        after = [queue.send(square, (i,)) for i in range(5)]  # and still consuming
        assert [j.get(timeout=20) for j in after] == [i * i for i in range(5)]
    finally:
        consumers.stop()


@pytest.mark.timeout(90)
def test_a_chord_whose_header_consumers_are_killed_fires_once(cluster, tmp_path):
    queue = new_queue("chord", prefetch=1, heartbeat_ttl=1.0)
    path = str(tmp_path / "runs")
    header = [queue.spec(work, (path, 0.3)) for _ in range(6)]
    callback = queue.spec(add_parts, (), {"offset": 0})
    consumers = queue.consume([work, add_parts], num_consumers=3)
    try:
        queue.client.chord(header, callback, chord_id=os.urandom(8).hex())
        wait_for(lambda: len(runs(path + ".start")) >= 3, timeout=30)
        killed = []
        for info in list(queue.consumers().values())[:2]:
            if kill(info["pid"]):
                killed.append(info["pid"])
        assert killed
        pids_sum = queue.job(callback.job_id).get(timeout=60)
        header_pids = [queue.job(s.job_id).get(timeout=1) for s in header]
        assert pids_sum == sum(header_pids)
        assert queue.job(callback.job_id).info()["deliveries"] == "1"  # fired once
    finally:
        consumers.stop()


@pytest.mark.timeout(60)
def test_a_chain_passes_each_result_to_the_next_step(cluster):
    queue = new_queue("chain")
    consumers = queue.consume([square, add_parts], num_consumers=1)
    try:
        first = queue.spec(square, (3,))
        second = queue.spec(square, ())
        second.options.pass_parent = True
        ids = queue.client.chain([first, second])
        assert queue.job(ids[-1]).get(timeout=20) == 81
    finally:
        consumers.stop()


def test_bad_options_raise_at_the_call_site(cluster):
    queue = new_queue("bad")
    with pytest.raises(ValueError, match="priority"):
        queue.send(square, (1,), priority=12)
    with pytest.raises(ValueError, match="rate limit"):
        Queue("x", rate_limit="ten per second")
    with pytest.raises(ValueError, match="queue name"):
        Queue("a:b")
    with pytest.raises(TypeError, match="args"):
        queue.client.enqueue(JobSpec(name="x", args=5))
    with pytest.raises(ValueError, match="countdown or eta"):
        queue.send(square, (1,), countdown=1, eta=time.time())
