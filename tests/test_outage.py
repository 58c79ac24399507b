"""Riding out Redis outages on real clusters: nodes keep serving while Redis is away, register
again when it comes back without their entry, stop when declared dead or when Redis stays
away past REDRAY_REDIS_OUTAGE_SECONDS; drivers keep running tasks and calls to live actors,
calls that need Redis raise GcsUnavailableError after the limit, and actor states published
while a driver's subscription was down are read back from the table.

Each test builds its own cluster (`LocalCluster`: a Redis and raylets started by the test),
since it kills or restarts that Redis.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import redis
from conftest import REPO, last_json, wait_for
from test_multinode import LocalCluster

import redray
from redray.exceptions import GcsUnavailableError, RaySystemError
from redray.node.redis_server import RedisServer
from redray.outage import OUTAGE_ENV, outage_limit


@redray.remote
def square(x: int) -> int:
    return x * x


@redray.remote
class Counter:
    def __init__(self):
        self.n = 0

    def incr(self) -> int:
        self.n += 1
        return self.n


@pytest.fixture
def local_cluster():
    """A cluster of the test's own; the driver of this process disconnected at both ends."""
    redray.shutdown()
    made: list[LocalCluster] = []

    def make(**kwargs) -> LocalCluster:
        made.append(LocalCluster(**kwargs))
        return made[-1]

    yield make
    for cluster in made:
        cluster.shutdown()
    redray.shutdown()


def raylet_log(started) -> str:
    return (Path(started.session_dir) / "logs" / "raylet.log").read_text()


def restart_empty(cluster: LocalCluster) -> None:
    """Bring the cluster's Redis back on its port with its password, without its data."""
    old = cluster.redis
    cluster.redis = RedisServer.start(port=old.port, password=old.password)
    cluster.redis.wait_ready()


# -- nodes -------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_a_node_serves_through_an_outage_and_registers_again_when_redis_lost_it(local_cluster):
    cluster = local_cluster()
    head = cluster.add_node("127.0.0.1", 2, head=True)
    cluster.wait_nodes(1)
    redray.init(address=cluster.url)
    counter = Counter.remote()
    assert redray.get(counter.incr.remote(), timeout=30) == 1
    assert redray.get(square.remote(2), timeout=30) == 4

    cluster.redis.stop()  # SIGKILL
    # Tasks and calls to a live actor never need Redis.
    assert redray.get([square.remote(i) for i in range(50)], timeout=30) == [
        i * i for i in range(50)
    ]
    assert redray.get(counter.incr.remote(), timeout=30) == 2
    wait_for(lambda: "Lost the connection to Redis" in raylet_log(head), timeout=10)
    restart_empty(cluster)

    node_id = head.info["node_id"]
    wait_for(
        lambda: node_id in [n["node_id"] for n in cluster.alive_nodes()],
        timeout=20,
        message="the node never registered again",
    )
    assert cluster.gcs.cluster_token() == cluster.token  # the cluster entry is back too
    assert redray.get(counter.incr.remote(), timeout=30) == 3
    assert redray.get([square.remote(i) for i in range(10)], timeout=30) == [
        i * i for i in range(10)
    ]
    log = raylet_log(head)
    assert log.count("Lost the connection to Redis") == 1, log
    assert log.count("The connection to Redis is back") == 1, log
    assert f"registered again as node {node_id}" in log, log
    assert "Traceback" not in log, log


@pytest.mark.timeout(60)
def test_a_node_gives_up_when_redis_stays_away_past_the_limit(local_cluster, monkeypatch):
    monkeypatch.setenv(OUTAGE_ENV, "2")
    cluster = local_cluster()
    head = cluster.add_node("127.0.0.1", 1, head=True)
    cluster.wait_nodes(1)
    workers = psutil.Process(head.process.pid).children(recursive=True)
    assert workers
    cluster.redis.stop()
    started = time.monotonic()
    assert head.process.wait(timeout=30) == 1
    took = time.monotonic() - started
    print(f"the node stopped {took:.1f} s after Redis went (limit 2 s)")
    assert 2 <= took < 10, took
    psutil.wait_procs(workers, timeout=10)
    assert not [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    log = raylet_log(head)
    assert log.count("Lost the connection to Redis") == 1, log
    assert "this node gives up and stops" in log, log
    assert "Traceback" not in log, log


@pytest.mark.timeout(90)
def test_a_node_declared_dead_while_frozen_stops_instead_of_running_on(local_cluster):
    cluster = local_cluster(node_timeout=2)
    cluster.add_node("127.0.0.1", 1, head=True)
    frozen = cluster.add_node("127.0.0.2", 1)
    cluster.wait_nodes(2)
    node_id = frozen.info["node_id"]
    workers = psutil.Process(frozen.process.pid).children(recursive=True)
    frozen.process.send_signal(signal.SIGSTOP)  # it misses its heartbeats
    try:
        wait_for(
            lambda: node_id in [n["node_id"] for n in cluster.gcs.dead_nodes()],
            timeout=30,
            message="the frozen node was never declared dead",
        )
    finally:
        frozen.process.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
    # Its actors and tasks were restarted elsewhere: it must not carry on as a zombie.
    assert frozen.process.wait(timeout=20) == 1
    print(f"the node declared dead exited {time.monotonic() - resumed:.1f} s after it resumed")
    psutil.wait_procs(workers, timeout=10)
    assert not [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    log = raylet_log(frozen)
    assert "was declared dead by the cluster" in log, log
    assert "Traceback" not in log, log


# -- drivers -----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_calls_that_need_redis_wait_for_it_then_raise_a_typed_error(local_cluster, monkeypatch):
    cluster = local_cluster()
    cluster.add_node("127.0.0.1", 2, head=True)
    cluster.wait_nodes(1)
    monkeypatch.setenv(OUTAGE_ENV, "2")  # this driver's limit (the node keeps the default)
    redray.init(address=cluster.url, namespace="outage")
    counter = Counter.options(name="counter").remote()
    assert redray.get(counter.incr.remote(), timeout=30) == 1
    assert redray.get(square.remote(3), timeout=30) == 9

    cluster.redis.stop()
    assert redray.get(counter.incr.remote(), timeout=30) == 2
    assert redray.get([square.remote(i) for i in range(20)], timeout=30) == [
        i * i for i in range(20)
    ]
    started = time.monotonic()
    with pytest.raises(GcsUnavailableError) as caught:
        redray.get_actor("counter")
    assert 2 <= time.monotonic() - started < 6
    assert isinstance(caught.value, RaySystemError)
    assert OUTAGE_ENV in str(caught.value)
    started = time.monotonic()
    with pytest.raises(GcsUnavailableError):
        Counter.remote()
    assert time.monotonic() - started < 6
    assert redray.get(counter.incr.remote(), timeout=30) == 3  # and the node still serves


LATE_ACTOR_DRIVER = """
import json, os, sys, time
import redray

url, gate, mark, fail = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "fail"
redray.init(address=url)


@redray.remote
class Late:
    def __init__(self, gate, fail):
        while not os.path.exists(gate):
            time.sleep(0.01)
        if fail:
            raise ValueError("the constructor failed")

    def ping(self):
        return "pong"


actor = Late.remote(gate, fail)
ref = actor.ping.remote()  # queued until the actor is alive
with open(mark + ".tmp", "w") as f:
    f.write(actor._actor_id.hex())
os.replace(mark + ".tmp", mark)
try:
    outcome = redray.get(ref, timeout=20)
except redray.exceptions.ActorDiedError:
    outcome = "died"
except redray.exceptions.GetTimeoutError:
    outcome = "still queued"
print(json.dumps({"outcome": outcome}))
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("outcome", "state", "expected"), [("live", "ALIVE", "pong"), ("fail", "DEAD", "died")]
)
def test_an_actor_state_published_while_the_subscription_was_down_is_read_back(
    local_cluster, tmp_path, outcome, state, expected
):
    """A driver whose subscription is cut while its actor becomes alive (or dies) missed the
    message: once subscribed again it reads the actor's state from the table, so the call
    queued for it runs (or fails) instead of waiting forever."""
    cluster = local_cluster()
    cluster.add_node("127.0.0.1", 2, head=True)
    cluster.wait_nodes(1)
    gate, mark = tmp_path / "gate", tmp_path / "submitted"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    driver = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(LATE_ACTOR_DRIVER)]
        + [cluster.url, str(gate), str(mark), outcome],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_for(lambda: mark.exists() or driver.poll() is not None, timeout=30)
        assert driver.poll() is None, driver.communicate()
        actor_id = mark.read_text()
        process = psutil.Process(driver.pid)
        process.suspend()
        try:
            cut_connections(cluster, process)
            gate.touch()
            wait_for(
                lambda: (cluster.gcs.actor(actor_id) or {}).get("state") == state,
                timeout=30,
                message=f"the actor never became {state}",
            )
        finally:
            process.resume()
        out, err = driver.communicate(timeout=40)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
    assert driver.returncode == 0, err
    assert last_json(out) == {"outcome": expected}, err


def cut_connections(cluster: LocalCluster, process: psutil.Process) -> None:
    """Close, on Redis's side, every connection of process to it (its subscription too)."""
    ports = {
        c.laddr.port
        for c in process.net_connections(kind="tcp")
        if c.raddr and c.raddr.port == cluster.redis.port
    }
    admin = redis.Redis.from_url(cluster.url)
    try:
        clients = [c for c in admin.client_list() if int(c["addr"].rsplit(":", 1)[1]) in ports]
        assert any(int(c.get("psub", 0)) for c in clients), clients  # its subscription
        for client in clients:
            admin.client_kill(client["addr"])
    finally:
        admin.close()


def test_outage_limit_must_be_a_positive_number(monkeypatch):
    for bad in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv(OUTAGE_ENV, bad)
        with pytest.raises(ValueError, match=OUTAGE_ENV):
            outage_limit()
    monkeypatch.setenv(OUTAGE_ENV, "2.5")
    assert outage_limit() == 2.5
    monkeypatch.delenv(OUTAGE_ENV)
    assert outage_limit() == 60
