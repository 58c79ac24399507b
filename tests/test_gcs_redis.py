"""`redray.gcs.Gcs` against real redis-server processes: the scripts on a real server, a hung
server, a server restarted empty, a Sentinel failover, and the key count after many
lifecycles."""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import weakref
from pathlib import Path

import pytest
import redis
from conftest import wait_for
from test_gcs import (
    CAPS,
    NODE_INFO,
    check_isolated,
    check_key_count_returns_to_baseline,
    leader,
    lose_lease,
    next_message,
    populate,
    snapshot,
    stale_writes,
)

from redray.exceptions import GcsUnavailableError, RaySystemError
from redray.gcs import NAMED_ACTORS, Gcs, HeartbeatStatus, NotLeaderError
from redray.node.redis_server import RedisServer, find_redis_server, free_port
from redray.node.worker_pool import die_with_parent
from redray.outage import health


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer.start(
        port=0, password="s3cret/pw", directory=str(tmp_path_factory.mktemp("redis"))
    )
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture
def own_server(tmp_path):
    """A redis-server of the test's own, to stop, hang or restart."""
    server = RedisServer.start(port=0, password="pw", directory=str(tmp_path))
    server.wait_ready()
    yield server
    if server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


def test_round_trip_on_real_redis_server(redis_server):
    """The same schema and scripts on a real server, reached by URL with a password."""
    a = Gcs(redis_server.url, "real-a")
    b = Gcs(redis_server.url, "real-b")
    try:
        assert a.ping()
        check_isolated(a, b)
        assert b.hold_leadership("intruder", ttl=30) == 0
        assert a.claim_name(NAMED_ACTORS, "ns", "name", "someone-else") == "actor-a"
        pubsub = b.subscribe(["ch:test"])
        b.publish("ch:test", {"x": [1, 2]})
        assert next_message(pubsub) == {"x": [1, 2]}
        pubsub.close()
        a.register_node("short", NODE_INFO, ttl=0.2)
        wait_for(
            lambda: not next(n for n in a.live_nodes() if n["node_id"] == "short")["alive"],
            timeout=5,
        )
    finally:
        a.close()
        b.close()


def test_wrong_password_is_refused(redis_server):
    url = redis_server.url.replace("s3cret", "wrong")
    bad = Gcs(url, "x")
    with pytest.raises(redis.exceptions.AuthenticationError):
        bad.ping()
    bad.close()


@pytest.mark.parametrize("write", list(stale_writes(None, None)))
def test_a_stale_leader_writes_nothing_on_real_redis_server(redis_server, write):
    gcs = Gcs(redis_server.url, f"stale-{write}")
    other = Gcs(redis_server.url, f"stale-{write}")
    try:
        fence = leader(gcs, "head-a")
        populate(gcs, fence)
        lose_lease(gcs)
        assert leader(other, "head-b").epoch == fence.epoch + 1
        before = snapshot(gcs)
        with pytest.raises(NotLeaderError):
            stale_writes(gcs, fence)[write]()
        assert snapshot(gcs) == before
    finally:
        gcs.redis.flushall()
        gcs.close()
        other.close()


def test_a_waiting_take_gets_the_whole_burst_on_real_redis_server(redis_server):
    """The blocking wait returns with the first request; the fenced take behind it moves
    the burst."""
    gcs = Gcs(redis_server.url, "real-requests")
    pusher = Gcs(redis_server.url, "real-requests")
    taken: list = []
    try:
        fence = leader(gcs)
        reader = threading.Thread(target=lambda: taken.append(gcs.take_requests(fence, 2)))
        reader.start()
        wait_for(lambda: gcs.redis.info("clients")["blocked_clients"] >= 1)
        pusher.push_requests([("remove_pg", {"pg_id": p}) for p in ("a", "b", "c")])
        reader.join(10)
        assert [[r.args for r in burst] for burst in taken] == [[("a",), ("b",), ("c",)]]
        assert gcs.unacked_requests() == taken[0]
    finally:
        gcs.close()
        pusher.close()


def test_a_long_wait_for_requests_is_cut_below_the_socket_timeout(redis_server):
    gcs = Gcs(redis_server.url, "real-wait", socket_timeout=1.0)
    try:
        fence = leader(gcs)
        started = time.monotonic()
        assert gcs.take_requests(fence, timeout=60) == []  # no TimeoutError: Redis answered
        assert time.monotonic() - started < 1.0
    finally:
        gcs.close()


# -- a hung server ---------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_calls_to_a_hung_redis_fail_with_a_timeout(own_server):
    gcs = Gcs(own_server.url, "hung", socket_timeout=0.5)
    gcs.register_node("n1", NODE_INFO, ttl=30)
    subscription = gcs.subscription(["ch:nodes"], ping_seconds=0.2, silence_seconds=0.5)
    wait_for(lambda: (subscription.get_message(0.05) or {}).get("type") == "subscribe")
    os.kill(own_server.process.pid, signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        gcs.heartbeat("n1", {"CPU": 1.0}, ttl=30)
    # Each try waits one socket timeout, and there are RETRY_ATTEMPTS retries.
    assert time.monotonic() - started < 4
    started = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        while True:
            subscription.get_message(0.1)
    assert time.monotonic() - started < 2
    os.kill(own_server.process.pid, signal.SIGCONT)
    assert gcs.heartbeat("n1", {"CPU": 1.0}, ttl=30) is HeartbeatStatus.OK
    fresh = gcs.subscription(["ch:nodes"])
    wait_for(lambda: (fresh.get_message(0.05) or {}).get("type") == "subscribe")
    gcs.publish("ch:nodes", {"back": True})
    assert next_message(fresh) == {"back": True}
    fresh.close()
    gcs.close()


# -- a server restarted empty ------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_a_node_rides_out_a_restart_that_lost_everything(own_server, tmp_path):
    gcs = Gcs(own_server.url, "restart")
    gcs.init_cluster(b"token", {"c": 1})
    gcs.register_node("n1", {**NODE_INFO, "start_time": 5.0}, ttl=30)
    fence = leader(gcs)
    own_server.stop()
    with pytest.raises(redis.ConnectionError):
        gcs.heartbeat("n1", {"CPU": 1.0}, ttl=30)  # while it is down: a typed error, fast
    again = RedisServer.start(port=own_server.port, password="pw", directory=str(tmp_path))
    own_server.process = again.process
    again.wait_ready()
    # The same client reconnects; the node learns Redis lost it and rejoins.
    assert gcs.heartbeat("n1", {"CPU": 1.0}, ttl=30) is HeartbeatStatus.UNKNOWN
    assert not gcs.cluster_exists()
    gcs.rejoin_cluster(b"token", "n1", {**NODE_INFO, "start_time": 5.0}, ttl=30, config={"c": 1})
    assert gcs.heartbeat("n1", {"CPU": 1.0}, ttl=30) is HeartbeatStatus.OK
    assert [(n["node_id"], n["start_time"]) for n in gcs.live_nodes()] == [("n1", 5.0)]
    # The old leader's fence died with the data; a new tenure gets a larger epoch.
    with pytest.raises(NotLeaderError):
        gcs.update_actor("a1", {"state": "ALIVE"}, fence)
    assert gcs.hold_leadership("head-a", ttl=30) > fence.epoch
    gcs.close()


# -- a client that rides outages out (drivers and workers) ------------------------------------
@pytest.fixture
def redis_log(caplog):
    """The warnings redray logs about Redis, and a fresh process health for the test."""
    caplog.set_level(logging.WARNING, logger="redray")
    health.back()  # (a previous test may have left this process's health "down")
    caplog.clear()
    yield lambda: [r.getMessage() for r in caplog.records if "Redis" in r.getMessage()]
    health.back()


@pytest.mark.timeout(30)
def test_a_riding_client_waits_for_redis_to_come_back(own_server, tmp_path, redis_log):
    gcs = Gcs(own_server.url, "ride", ride_out=20)
    gcs.kv_put(b"k", b"before")
    own_server.stop()
    result: list = []
    call = threading.Thread(target=lambda: result.append(gcs.kv_get(b"k")))
    call.start()
    wait_for(lambda: health.down, timeout=10, message="the outage was never noticed")
    assert call.is_alive()  # waiting for Redis, not failed
    again = RedisServer.start(port=own_server.port, password="pw", directory=str(tmp_path))
    own_server.process = again.process
    again.wait_ready()
    call.join(10)
    assert result == [None]  # the restarted server is empty; the call went through
    messages = redis_log()
    assert len(messages) == 2, messages
    assert messages[0].startswith("Lost the connection to Redis")
    assert messages[1].startswith("The connection to Redis is back")
    gcs.close()


@pytest.mark.timeout(30)
def test_a_riding_client_gives_up_after_its_limit_with_a_typed_error(own_server, redis_log):
    gcs = Gcs(own_server.url, "ride", ride_out=1.0)
    assert gcs.ping()
    own_server.stop()
    started = time.monotonic()
    with pytest.raises(GcsUnavailableError) as caught:
        gcs.lookup_name(NAMED_ACTORS, "ns", "name")
    took = time.monotonic() - started
    assert 1.0 <= took < 4, took
    assert isinstance(caught.value, RaySystemError)
    assert not isinstance(caught.value, redis.RedisError)
    assert "REDRAY_REDIS_OUTAGE_SECONDS" in str(caught.value)
    # Lowered to 0 (a process leaving): the next call gives up after the short retries.
    gcs.ride_out = 0.0
    started = time.monotonic()
    with pytest.raises(GcsUnavailableError):
        gcs.kv_get(b"k")
    assert time.monotonic() - started < 1.5
    # A subscription never rides an outage out: its thread must learn of it at once.
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        gcs.ride_out = 30.0
        gcs.subscription(["ch:nodes"])
    assert time.monotonic() - started < 3
    assert len([m for m in redis_log() if m.startswith("Lost the connection")]) == 1
    gcs.close()


# -- Sentinel failover -------------------------------------------------------------------------
def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [find_redis_server(), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )


def _wait_port(port: int, timeout: float = 10) -> None:
    def accepting() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    wait_for(accepting, timeout=timeout, interval=0.01)


@pytest.fixture
def sentinel_deployment(tmp_path: Path):
    """A primary, a replica and three sentinels (quorum 2), all password-protected."""
    password, sentinel_password = "redis-pw", "sentinel-pw"
    processes: list[subprocess.Popen] = []
    primary_port, replica_port = free_port(), free_port()
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    auth = ["--requirepass", password, "--masterauth", password]
    primary = _start(["--port", str(primary_port), "--dir", str(tmp_path), *common, *auth])
    processes.append(primary)
    replica_dir = tmp_path / "replica"
    replica_dir.mkdir()
    replica = _start(
        [
            "--port",
            str(replica_port),
            "--dir",
            str(replica_dir),
            "--replicaof",
            "127.0.0.1",
            str(primary_port),
            *common,
            *auth,
        ]
    )
    processes.append(replica)
    sentinel_ports = [free_port() for _ in range(3)]
    for port in sentinel_ports:
        config = tmp_path / f"sentinel-{port}.conf"
        config.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\nrequirepass {sentinel_password}\n"
            f"sentinel monitor svc 127.0.0.1 {primary_port} 2\n"
            f"sentinel auth-pass svc {password}\n"
            f"sentinel sentinel-pass {sentinel_password}\n"
            "sentinel down-after-milliseconds svc 400\n"
            "sentinel failover-timeout svc 2000\n"
            "sentinel parallel-syncs svc 1\n"
        )
        processes.append(_start([str(config), "--sentinel"]))
    try:
        for port in (primary_port, replica_port, *sentinel_ports):
            _wait_port(port)
        sentinels = [
            redis.Redis(port=p, password=sentinel_password, socket_timeout=2)
            for p in sentinel_ports
        ]

        def ready() -> bool:  # every sentinel knows the replica and the other sentinels
            return all(
                len(s.sentinel_slaves("svc")) == 1 and len(s.sentinel_sentinels("svc")) == 2
                for s in sentinels
            )

        wait_for(ready, timeout=15, interval=0.1)
        for s in sentinels:
            s.close()
        hosts = ",".join(f"127.0.0.1:{p}" for p in sentinel_ports)
        url = f"redis+sentinel://:{password}@{hosts}/svc?sentinel_password={sentinel_password}"
        yield url, primary, primary_port, replica_port, password
    finally:
        for process in processes:
            process.kill()
            process.wait()


@pytest.mark.timeout(60)
def test_sentinel_failover_reaches_the_new_primary(sentinel_deployment):
    url, primary, primary_port, replica_port, password = sentinel_deployment
    gcs = Gcs(url, "ha")
    gcs.init_cluster(b"token")
    gcs.register_node("n1", NODE_INFO, ttl=60)
    fence = leader(gcs, "head-a", ttl=60)
    assert gcs.redis.connection_pool.connection_kwargs.get("port") is None  # found by asking
    with redis.Redis(port=primary_port, password=password) as direct:
        assert direct.wait(1, 5000) == 1  # the replica has everything written so far
    primary.kill()  # SIGKILL
    primary.wait()
    started = time.monotonic()

    def write_succeeds() -> bool:
        try:
            gcs.kv_put(b"after", b"failover")
            return True
        except redis.ConnectionError:
            return False

    wait_for(write_succeeds, timeout=25, interval=0.1, message="no new primary reached")
    took = time.monotonic() - started
    with redis.Redis(port=replica_port, password=password) as promoted:
        assert promoted.info("replication")["role"] == "master"
        assert promoted.hget(gcs.key("kv:"), b"after") == b"failover"
    # The same object carries on against the new primary, with what was replicated.
    assert gcs.cluster_token() == b"token"
    assert gcs.heartbeat("n1", {"CPU": 1.0}, ttl=60) is HeartbeatStatus.OK
    assert gcs.hold_leadership("head-a", ttl=60) == fence.epoch
    gcs.update_actor("a1", {"state": "ALIVE"}, fence)
    assert gcs.actor("a1") == {"state": "ALIVE"}
    assert took < 25
    gcs.close()


# -- bounded state -------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_key_count_returns_to_baseline_on_real_redis_server(monkeypatch, own_server):
    """1,000 actors, placement groups, jobs and nodes from creation to end: the key count
    is back where it was and every table is held at its cap."""
    for name, cap in CAPS.items():
        monkeypatch.setenv(f"REDRAY_MAX_{name}", str(cap))
    gcs = Gcs(own_server.url, "bounded")
    check_key_count_returns_to_baseline(gcs, 1000)
    gcs.close()


def test_an_error_reply_handled_inside_keeps_no_caller_object_alive(redis_server):
    """A script not cached on the server yet fails (NOSCRIPT) and is sent again: that error
    must not leave a reference cycle holding its callers' frames, or a user's objects (refs,
    and through them shared memory) would live until the cyclic GC happened to run."""
    gcs = Gcs(redis_server.url, cluster=f"nocycle{os.getpid()}")
    gcs.redis.script_flush()

    class Marker:
        pass

    def caller(value: Marker) -> int:
        return gcs.hold_leadership("holder", 1.0)  # first EVALSHA: NOSCRIPT, then EVAL

    gc.collect()
    gc.disable()
    try:
        marker = Marker()
        alive = weakref.ref(marker)
        assert caller(marker) >= 1
        del marker
        assert alive() is None
    finally:
        gc.enable()
        gcs.close()
