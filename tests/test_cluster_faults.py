"""Clusters that change under the driver: nodes joining late, nodes dying, heads failing over.

Each test builds its own cluster (see `LocalCluster` in test_multinode.py) because it kills
or adds nodes. Fault tests SIGKILL raylet processes; the node's workers die with it.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from conftest import run_driver
from test_multinode import LocalCluster, node_ids, wait_for

import redray
from redray.exceptions import ObjectLostError, OwnerDiedError
from redray.util import placement_group
from redray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@pytest.fixture(autouse=True)
def no_driver():
    redray.shutdown()
    yield
    redray.shutdown()


def test_placement_group_waits_until_a_node_that_fits_joins():
    cluster = LocalCluster()
    try:
        cluster.add_node("127.0.0.1", 1, head=True)
        cluster.add_node("127.0.0.2", 1)
        cluster.wait_nodes(2)
        redray.init(address=cluster.url, _node_ip_address="127.0.0.1")
        pg = placement_group([{"CPU": 1}] * 3, strategy="STRICT_SPREAD")
        ready = pg.ready()
        assert not pg.wait(timeout_seconds=1.5)  # only two nodes: pending
        cluster.add_node("127.0.0.3", 1)
        assert pg.wait(timeout_seconds=30)
        assert redray.get(ready, timeout=10).id == pg.id
    finally:
        cluster.shutdown()


@pytest.mark.timeout(180)
def test_killed_node_tasks_retried_actor_restarted_objects_rebuilt():
    cluster = LocalCluster(node_timeout=3.0)
    try:
        cluster.add_node("127.0.0.1", 1, head=True)
        victim = cluster.add_node("127.0.0.2", 2, resources={"worker_node": 1, "victim": 1})
        cluster.add_node("127.0.0.3", 2, resources={"worker_node": 1})
        cluster.wait_nodes(3)
        redray.init(address=cluster.url, _node_ip_address="127.0.0.1")
        ids = node_ids(cluster)
        victim_id = ids["127.0.0.2"]

        @redray.remote(resources={"worker_node": 0.01}, max_retries=3)
        def slow_square(x: int) -> tuple[int, str]:
            time.sleep(1.0)
            return x * x, redray.get_runtime_context().get_node_id()

        @redray.remote(max_restarts=1, resources={"worker_node": 0.5})
        class Keeper:
            def node(self):
                return redray.get_runtime_context().get_node_id()

        # Pin the actor to the victim first (it also fits node3, where it must restart).
        keeper = Keeper.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(victim_id, soft=True)
        ).remote()
        assert redray.get(keeper.node.remote(), timeout=30) == victim_id

        on_victim = NodeAffinitySchedulingStrategy(victim_id, soft=True)

        @redray.remote(resources={"worker_node": 0.01})
        def big_on_victim() -> np.ndarray:
            return np.full(20 * 1024 * 1024, 7, dtype=np.uint8)  # stored on the victim only

        @redray.remote(resources={"worker_node": 0.01}, max_retries=0)
        def unrepeatable() -> np.ndarray:
            return np.zeros(20 * 1024 * 1024, dtype=np.uint8)

        @redray.remote(resources={"victim": 0.5})
        def put_on_victim() -> list:
            return [redray.put(np.ones(20 * 1024 * 1024, dtype=np.uint8))]

        rebuilt = big_on_victim.options(scheduling_strategy=on_victim).remote()
        lost = unrepeatable.options(scheduling_strategy=on_victim).remote()
        owned_there = redray.get(put_on_victim.remote(), timeout=30)[0]
        redray.wait([rebuilt, lost], num_returns=2, timeout=30)

        running = [slow_square.remote(i) for i in range(8)]
        time.sleep(0.5)  # let some start on the victim before it dies
        killed_at = time.monotonic()
        os.kill(victim.process.pid, signal.SIGKILL)

        results = redray.get(running, timeout=120)
        assert [value for value, _ in results] == [i * i for i in range(8)]
        assert wait_for(lambda: victim_id not in node_ids(cluster), timeout=10)
        assert time.monotonic() - killed_at < 5.0

        # The actor restarts on the surviving worker node.
        assert wait_for(
            lambda: _try(lambda: redray.get(keeper.node.remote(), timeout=10)) == ids["127.0.0.3"],
            timeout=40,
        )
        # Lineage: the object made only on the victim is made again by re-running its task.
        value = redray.get(rebuilt, timeout=60)
        assert value.shape == (20 * 1024 * 1024,) and int(value[0]) == 7
        # Not repeatable (max_retries=0) -> lost; owned by a worker of the dead node -> owner died.
        with pytest.raises(ObjectLostError):
            redray.get(lost, timeout=30)
        with pytest.raises(OwnerDiedError):
            redray.get(owned_there, timeout=30)
    finally:
        cluster.shutdown()


def _try(fn):
    try:
        return fn()
    except Exception:
        return None


@pytest.mark.timeout(120)
def test_standby_head_takes_over_the_control_loop():
    cluster = LocalCluster()
    try:
        first = cluster.add_node("127.0.0.1", 1, head=True)
        cluster.add_node("127.0.0.2", 1, head=True)  # standby: same Redis, waits for the lease
        cluster.add_node("127.0.0.3", 2, resources={"node3": 1})
        cluster.wait_nodes(3)
        first_id = node_ids(cluster)["127.0.0.1"]
        assert wait_for(lambda: cluster.gcs.leader() == first_id)
        redray.init(address=cluster.url, _node_ip_address="127.0.0.3")

        @redray.remote(resources={"node3": 0.1})
        class Counter:
            def __init__(self):
                self.n = 0

            def incr(self):
                self.n += 1
                return self.n

        keeper = Counter.options(name="keeper", lifetime="detached").remote()
        assert redray.get(keeper.incr.remote(), timeout=30) == 1

        os.kill(first.process.pid, signal.SIGKILL)
        standby_id = node_ids(cluster)["127.0.0.2"]
        assert wait_for(lambda: cluster.gcs.leader() == standby_id, timeout=20)
        # The detached actor lives on; the new leader serves lookups and new actors.
        assert redray.get(redray.get_actor("keeper").incr.remote(), timeout=30) == 2
        fresh = Counter.remote()
        assert redray.get(fresh.incr.remote(), timeout=30) == 1
        redray.kill(keeper)
    finally:
        cluster.shutdown()


@pytest.mark.timeout(90)
def test_the_leader_never_declares_its_own_node_dead():
    """The head runs the control loop: while it runs, its node is alive, even when its
    heartbeat is late (a stalled beat thread on a busy machine) or gone from Redis. Its
    heartbeat key is deleted over and over for longer than the node timeout: the head keeps
    running tasks and is still listed alive."""
    out = run_driver(
        """
import time
import redray
from redray import gcs as schema
from redray.core import context

redray.init(num_cpus=1)

@redray.remote
def one():
    return 1

assert redray.get(one.remote()) == 1
gcs = context.current.gcs
node_id = redray.get_runtime_context().get_node_id()
beat = gcs.key(schema.HEARTBEAT.format(node_id=node_id))
end = time.monotonic() + 7.0  # the node timeout is 4 s
while time.monotonic() < end:
    gcs.redis.delete(beat)
    time.sleep(0.002)
assert redray.get(one.remote(), timeout=20) == 1
deadline = time.monotonic() + 10  # (listed alive again at its next beat)
while [n["Alive"] for n in redray.nodes()] != [True] and time.monotonic() < deadline:
    time.sleep(0.05)
assert [n["Alive"] for n in redray.nodes()] == [True], redray.nodes()
print("ALIVE")
redray.shutdown()
""",
        timeout=80,
    )
    assert "ALIVE" in out.stdout
