"""Multi-node clusters on one machine: each node its own raylet process with its own store.

Nodes get distinct loopback addresses (127.0.0.1, .2, .3), so a driver can attach to a chosen
node and every cross-node path (spillback, object transfer, node death) is real TCP between
separate processes. Fault tests SIGKILL a node's raylet (its workers die with it).
"""

from __future__ import annotations

import secrets
import time

import numpy as np
import pytest

import redray
from redray.gcs import Gcs
from redray.node import launch as node_mod
from redray.node.redis_server import RedisServer
from redray.transport.protocol import new_token
from redray.util import placement_group, remove_placement_group
from redray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

STORE = 1200 * 1024 * 1024


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


class LocalCluster:
    """Redis plus raylet processes started by the test itself."""

    def __init__(self, node_timeout: float | None = None):
        self.redis = RedisServer.start(password=secrets.token_hex(8))
        self.redis.wait_ready()
        self.url = self.redis.url
        self.token = new_token()
        self.gcs = Gcs(self.url)
        self.gcs.init_cluster(self.token)
        self.nodes: list[node_mod.StartedNode] = []
        self.node_timeout = node_timeout

    def add_node(self, ip: str, num_cpus: float, head: bool = False, resources=None, **kwargs):
        started = node_mod.start_node(
            head=head,
            token=self.token,
            cluster="default",
            resources=node_mod.default_resources(num_cpus, None, resources, ip, head=head),
            object_store_memory=STORE,
            node_ip_address=ip,
            gcs_url=self.url,
            private=True,
            node_timeout=self.node_timeout,
            **kwargs,
        )
        self.nodes.append(started)
        return started

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.gcs.nodes() if n["alive"]]

    def wait_nodes(self, count: int) -> None:
        assert wait_for(lambda: len(self.alive_nodes()) == count), self.gcs.nodes()

    def shutdown(self) -> None:
        redray.shutdown()
        for started in self.nodes:
            started.stop()
            node_mod.remove_session_dir(started.session_dir)
        self.gcs.close()
        self.redis.stop()


@pytest.fixture(scope="module")
def cluster3():
    cluster = LocalCluster()
    cluster.add_node("127.0.0.1", 1, head=True)
    cluster.add_node("127.0.0.2", 2, resources={"node2": 1, "worker_node": 1})
    cluster.add_node("127.0.0.3", 2, resources={"node3": 1, "worker_node": 1})
    cluster.wait_nodes(3)
    redray.init(address=cluster.url, _node_ip_address="127.0.0.1")
    yield cluster
    cluster.shutdown()


def node_ids(cluster: LocalCluster) -> dict[str, str]:
    return {n["node_ip_address"]: n["node_id"] for n in cluster.alive_nodes()}


@redray.remote
def where(delay: float = 0.0) -> str:
    time.sleep(delay)
    return redray.get_runtime_context().get_node_id()


def test_nodes_and_resources_cover_every_node(cluster3):
    assert len([n for n in redray.nodes() if n["Alive"]]) == 3
    assert redray.cluster_resources()["CPU"] == 5.0
    addresses = {n["NodeManagerAddress"] for n in redray.nodes()}
    assert addresses == {"127.0.0.1", "127.0.0.2", "127.0.0.3"}


def test_spillback_when_the_head_is_full(cluster3):
    # The head has one CPU: six half-second tasks must spill to the other nodes.
    seen = redray.get([where.remote(0.5) for _ in range(6)], timeout=60)
    assert len(set(seen)) >= 2


def test_custom_resources_route_tasks_and_actors(cluster3):
    ids = node_ids(cluster3)
    on2 = redray.get(where.options(resources={"node2": 0.5}).remote(), timeout=30)
    assert on2 == ids["127.0.0.2"]

    @redray.remote(resources={"node3": 0.5})
    class Where:
        def node(self):
            return redray.get_runtime_context().get_node_id()

    actor = Where.remote()
    assert redray.get(actor.node.remote(), timeout=30) == ids["127.0.0.3"]
    redray.kill(actor)


def test_node_affinity_and_spread(cluster3):
    ids = node_ids(cluster3)
    target = ids["127.0.0.3"]
    strategy = NodeAffinitySchedulingStrategy(node_id=target, soft=False)
    assert redray.get(where.options(scheduling_strategy=strategy).remote(), timeout=30) == target
    spread = redray.get(
        [where.options(scheduling_strategy="SPREAD").remote(0.3) for _ in range(6)], timeout=60
    )
    names = {v: k for k, v in ids.items()}
    assert len(set(spread)) == 3, [names.get(n) for n in spread]


def test_large_array_made_on_one_node_and_summed_on_another(cluster3):
    ids = node_ids(cluster3)

    @redray.remote(resources={"node2": 0.5})
    def make() -> np.ndarray:
        return np.arange(500 * 1024 * 1024 // 8, dtype=np.int64)  # 500 MB

    @redray.remote(resources={"node3": 0.5})
    def total(array: np.ndarray) -> tuple[int, str, bool]:
        return int(array.sum()), redray.get_runtime_context().get_node_id(), array.flags.writeable

    ref = make.remote()
    result, where_summed, writeable = redray.get(total.remote(ref), timeout=120)
    n = 500 * 1024 * 1024 // 8
    assert result == n * (n - 1) // 2
    assert where_summed == ids["127.0.0.3"]
    assert writeable is False  # read zero-copy from node3's own store
    # The driver (on the head) reads it too, pulled into the head's store.
    assert redray.get(ref, timeout=120)[-1] == n - 1


def test_strict_spread_over_three_nodes(cluster3):
    pg = placement_group([{"CPU": 1}] * 3, strategy="STRICT_SPREAD")
    assert pg.wait(timeout_seconds=30)
    table = redray.util.placement_group_table(pg)
    assert len(set(table["bundles_to_node_id"].values())) == 3
    placed = redray.get(
        [
            where.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, index), num_cpus=1
            ).remote()
            for index in range(3)
        ],
        timeout=60,
    )
    assert placed == [table["bundles_to_node_id"][i] for i in range(3)]
    remove_placement_group(pg)
    assert wait_for(lambda: redray.util.placement_group_table(pg)["state"] == "REMOVED")
