"""Redis, the control plane, fails mid-run: SIGKILLed and restarted, or its primary failed
over by Sentinel. Tasks and calls to existing actors never touch Redis; what does (new
actors, named-actor lookups, heartbeats) waits for it and carries on, and no node is
declared dead for an outage shorter than the node timeout.

- test_redis_sigkill_and_restart_on_same_port_loses_nothing: the Redis that
  `redray start --head` runs is its own process with AOF persistence in the session dir,
  so restarted with the same settings it comes back with the cluster's tables; every
  Redis client reconnects (with backoff) and re-reads what it mirrors.
- test_sentinel_failover_of_the_primary_loses_nothing: `redis+sentinel://` URLs
  (`redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE`) are accepted
  everywhere a Redis URL is, and clients follow Sentinel to the new primary.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import redis

from chaos.harness import (
    Cluster,
    Driver,
    alive,
    free_port,
    port_of,
    redis_command_line,
    redis_server_binary,
    redis_server_on,
    wait_for,
    wait_mark,
    wait_redis,
)

pytestmark = pytest.mark.chaos

BATCHES = 10
BATCH_TASKS = 100
OUTAGE_SECONDS = 1.5  # how long Redis stays down: shorter than the 4 s node timeout

# Batches of tasks, calls to a long-lived actor and a new actor per batch; batch 2 onwards
# may meet the outage, and batch RESUME_AT waits until the test says Redis is back.
BATCH_DRIVER = """
import json, os, sys, time
import redray

url, marks, batches, per_batch, resume_at = sys.argv[1:3] + [int(a) for a in sys.argv[3:6]]
redray.init(address=url, namespace="chaos")


@redray.remote
class Counter:
    def __init__(self):
        self.n = 0

    def incr(self):
        self.n += 1
        return self.n


@redray.remote
def square(i):
    time.sleep(0.002)
    return [i, i * i]


keeper = Counter.options(name="keeper", lifetime="detached").remote()
results, keeper_counts, fresh_counts = [], [], []
for batch in range(batches):
    if batch == resume_at:
        while not os.path.exists(os.path.join(marks, "redis-back")):
            time.sleep(0.01)
    refs = [square.remote(batch * per_batch + i) for i in range(per_batch)]
    results += redray.get(refs, timeout=60)
    keeper_counts.append(redray.get(keeper.incr.remote(), timeout=60))
    fresh_counts.append(redray.get(Counter.remote().incr.remote(), timeout=60))
    open(os.path.join(marks, f"batch-{batch}"), "w").close()
by_name = redray.get(redray.get_actor("keeper").incr.remote(), timeout=60)
print(json.dumps({
    "results": results, "keeper": keeper_counts, "fresh": fresh_counts, "by_name": by_name,
}))
"""


def start_batches(cluster: Cluster, marks: Path) -> Driver:
    marks.mkdir()
    return cluster.driver(
        BATCH_DRIVER, cluster.url, str(marks), str(BATCHES), str(BATCH_TASKS), "5"
    )


def check_batches(out: dict) -> None:
    assert out["results"] == [[i, i * i] for i in range(BATCHES * BATCH_TASKS)]
    assert out["keeper"] == list(range(1, BATCHES + 1))
    assert out["fresh"] == [1] * BATCHES
    assert out["by_name"] == BATCHES + 1


@pytest.mark.timeout(120)
def test_redis_sigkill_and_restart_on_same_port_loses_nothing(cluster: Cluster) -> None:
    head = cluster.start_head(num_cpus=2)
    port = port_of(cluster.url)
    server = redis_server_on(port)
    assert server is not None, f"no redis-server listens on {port}"
    argv, cwd = redis_command_line(cluster.url)
    marks = cluster.tmp / "marks"
    driver = start_batches(cluster, marks)
    wait_mark(marks / "batch-1", 60, driver)

    server.send_signal(signal.SIGKILL)
    wait_for(lambda: not alive(server), 10, "redis-server survived SIGKILL")
    time.sleep(OUTAGE_SECONDS)  # the outage itself, not a wait for anything
    cluster.spawn(argv, cwd)
    wait_redis(cluster.url)
    (marks / "redis-back").touch()

    check_batches(driver.result(timeout=90))
    state = cluster.status()
    assert state["nodes"] == {head.node_id: "ALIVE"}, state["text"]
    assert alive(head.process)


def sentinel_master(port: int) -> tuple[str, int] | None:
    client = redis.Redis(port=port, socket_timeout=2, decode_responses=True)
    try:
        address = client.execute_command("SENTINEL", "get-master-addr-by-name", "mymaster")
    except redis.RedisError:
        return None
    finally:
        client.close()
    return (address[0], int(address[1])) if address else None


@pytest.mark.timeout(120)
def test_sentinel_failover_of_the_primary_loses_nothing(cluster: Cluster) -> None:
    password = "chaos-sentinel"
    primary_url = cluster.start_redis(password)
    primary_port = port_of(primary_url)
    replica_url = cluster.start_redis(password, "--replicaof", "127.0.0.1", str(primary_port))
    replica_port = port_of(replica_url)
    sentinel_port = free_port()
    conf = cluster.tmp / "sentinel.conf"
    conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\ndir {cluster.tmp}\n"
        f"sentinel monitor mymaster 127.0.0.1 {primary_port} 1\n"
        f"sentinel auth-pass mymaster {password}\n"
        "sentinel down-after-milliseconds mymaster 1000\n"
        "sentinel failover-timeout mymaster 10000\n"
    )
    cluster.spawn([redis_server_binary(), str(conf), "--sentinel"])
    wait_for(
        lambda: sentinel_master(sentinel_port) == ("127.0.0.1", primary_port),
        10,
        "Sentinel never watched the primary",
    )
    primary = redis.Redis.from_url(primary_url, decode_responses=True)
    wait_for(
        lambda: primary.info("replication").get("connected_slaves") == 1,
        10,
        "the replica never connected",
    )
    primary.close()
    cluster.url = f"redis+sentinel://:{password}@127.0.0.1:{sentinel_port}/mymaster"
    head = cluster.start_head(num_cpus=2, redis_url=cluster.url)
    marks = cluster.tmp / "marks"
    driver = start_batches(cluster, marks)
    wait_mark(marks / "batch-1", 60, driver)

    redis_server_on(primary_port).send_signal(signal.SIGKILL)
    wait_for(
        lambda: sentinel_master(sentinel_port) == ("127.0.0.1", replica_port),
        30,
        "Sentinel never promoted the replica",
    )
    (marks / "redis-back").touch()

    check_batches(driver.result(timeout=90))
    state = cluster.status()
    assert state["nodes"] == {head.node_id: "ALIVE"}, state["text"]
