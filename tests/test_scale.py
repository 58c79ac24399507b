"""Scale: Ray's scalability envelope at sizes CI can afford, as correctness checks.

A 20,000-task queue, one task with 2,000 object arguments, one task returning 300 objects, a
`get` of 2,000 objects, 200 actors and 10 nodes: every result is checked, and what the work
held (the driver's references, the store's bytes, the actors' processes) is given back
afterwards. The speed and memory figures at full size live in scripts/scalebench.py.
"""

from __future__ import annotations

import gc
import secrets
import threading
import time

import numpy as np
import psutil
import pytest
import redis
from conftest import _shutdown_cluster, wait_for

import redray
from redray.core import context
from redray.gcs import Gcs
from redray.node import launch as node_mod
from redray.node.redis_server import RedisServer
from redray.transport.protocol import new_token

pytestmark = pytest.mark.timeout(180)

STORE_VALUE = 200 * 1024  # above the inline limit: these values live in the store


@redray.remote
def identity(i: int) -> int:
    return i


@redray.remote
def total(*values) -> int:
    return int(sum(int(np.asarray(v).sum()) for v in values))


@redray.remote(num_returns=300)
def many_returns(n: int) -> list:
    return [np.full(STORE_VALUE // 8, i, dtype=np.int64) if i % 30 == 0 else i for i in range(n)]


@redray.remote(num_cpus=0)
class Counter:
    def __init__(self, start: int):
        self.value = start

    def add(self, n: int) -> int:
        self.value += n
        return self.value


def held() -> tuple[int, int]:
    """The driver's reference-table entries and the bytes its node's store holds."""
    gc.collect()
    worker = context.current
    worker.ownership.process_released()
    used = worker.peers.call(worker.raylet, "store_stats", timeout=10)["used"]
    return len(worker.refs), used


def settles_to(baseline: tuple[int, int]) -> bool:
    return bool(wait_for(lambda: held() == baseline, timeout=30))


def node_worker_processes() -> int:
    me = psutil.Process()
    return sum(
        len(raylet.children(recursive=True)) for raylet in me.children() if raylet.is_running()
    )


def actor_unique_mb() -> list[float]:
    """Memory only each actor process has (USS, MB), over the processes running actors."""
    sizes = []
    for raylet in psutil.Process().children():
        for proc in raylet.children(recursive=True):
            try:
                if proc.children():  # the fork server
                    continue
                sizes.append(proc.memory_full_info().uss / 2**20)
            except psutil.Error:
                pass
    return sizes


def test_a_20000_task_queue(ray_start):
    baseline = held()
    refs = [identity.remote(i) for i in range(20_000)]
    assert redray.get(refs, timeout=120) == list(range(20_000))
    del refs
    assert settles_to(baseline), (held(), baseline)


def test_one_task_with_2000_object_arguments(ray_start):
    baseline = held()
    refs = [
        redray.put(np.full(STORE_VALUE // 8, 1, dtype=np.int64) if i % 100 == 0 else i)
        for i in range(2_000)
    ]
    expected = sum(i for i in range(2_000) if i % 100) + 20 * (STORE_VALUE // 8)
    assert redray.get(total.remote(*refs), timeout=60) == expected
    del refs
    assert settles_to(baseline), (held(), baseline)


def test_one_task_returning_300_objects(ray_start):
    baseline = held()
    refs = many_returns.remote(300)
    assert len(refs) == 300
    values = redray.get(refs, timeout=60)
    for i, value in enumerate(values):
        if i % 30 == 0:
            assert value.shape == (STORE_VALUE // 8,) and int(value[0]) == i
        else:
            assert value == i
    del refs, values
    assert settles_to(baseline), (held(), baseline)


def test_get_of_2000_objects(ray_start):
    baseline = held()
    refs = [
        redray.put(np.full(STORE_VALUE // 8, i, dtype=np.int64) if i % 50 == 0 else i)
        for i in range(2_000)
    ]
    values = redray.get(refs, timeout=60)
    assert [int(v[0]) if i % 50 == 0 else v for i, v in enumerate(values)] == list(range(2_000))
    del refs, values
    assert settles_to(baseline), (held(), baseline)


def test_200_actors_each_called_then_gone(ray_start):
    baseline = held()
    processes = node_worker_processes()
    actors = [Counter.remote(i) for i in range(200)]
    assert redray.get([a.add.remote(1) for a in actors], timeout=150) == list(range(1, 201))
    assert node_worker_processes() >= processes + 200 - 2  # one process each (two may reuse)
    # An idle actor shares what its fork server imported: its own pages stay few (they were
    # ~16 MB when each worker imported the Redis client itself and its first collections
    # copied every shared object's page).
    unique = sorted(actor_unique_mb())
    assert unique[len(unique) // 2] < 12, unique[:: len(unique) // 10]
    del actors
    assert wait_for(lambda: node_worker_processes() <= processes, timeout=60), (
        node_worker_processes(),
        processes,
    )
    assert settles_to(baseline), (held(), baseline)


def redis_calls(client: redis.Redis) -> dict[str, int]:
    return {k: int(v["calls"]) for k, v in client.info("commandstats").items()}


@pytest.mark.timeout(240)
def test_ten_nodes_share_the_work_and_idle_nodes_cost_redis_little():
    """Ten raylets with small stores: tasks spread over every one of them, and each beat of
    an idle node costs Redis the same few commands however many nodes there are (reading
    every node on every beat grew with the square of the nodes)."""
    _shutdown_cluster()
    server = RedisServer.start(password=secrets.token_hex(8))
    server.wait_ready()
    token = new_token()
    gcs = Gcs(server.url)
    gcs.init_cluster(token)
    nodes: list[node_mod.StartedNode] = []
    lock = threading.Lock()

    def start(i: int) -> None:
        ip = f"127.0.0.{i + 1}"
        started = node_mod.start_node(
            head=i == 0,
            token=token,
            cluster="default",
            resources=node_mod.default_resources(1, None, None, ip, head=i == 0),
            object_store_memory=64 * 2**20,
            node_ip_address=ip,
            gcs_url=server.url,
            private=True,
            timeout=120,
        )
        with lock:
            nodes.append(started)

    try:
        threads = [threading.Thread(target=start, args=(i,)) for i in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert wait_for(lambda: sum(n["alive"] for n in gcs.live_nodes()) == 10, timeout=60)

        client = redis.Redis.from_url(server.url, socket_timeout=10)
        before = redis_calls(client)
        time.sleep(3.0)  # idle: only beats and the control loop talk to Redis
        after = redis_calls(client)
        client.close()
        calls = {k: after[k] - before.get(k, 0) for k in after}
        beats = calls["cmdstat_hexists"]  # one per beat
        assert beats >= 10, calls
        # Per beat: its own heartbeat key, the view's counters and what the control loop
        # reads; reading every node's heartbeat on every beat made it 10 more here.
        assert calls["cmdstat_get"] / beats < 7, calls

        redray.init(address=server.url, _node_ip_address="127.0.0.1")
        baseline = held()
        where = identity.options(scheduling_strategy="SPREAD")

        @redray.remote(scheduling_strategy="SPREAD")
        def node_of(i: int) -> tuple[int, str]:
            return i, redray.get_runtime_context().get_node_id()

        results = redray.get([node_of.remote(i) for i in range(200)], timeout=120)
        assert sorted(i for i, _ in results) == list(range(200))
        assert len({node for _, node in results}) == 10
        assert redray.get([where.remote(i) for i in range(100)], timeout=60) == list(range(100))
        assert settles_to(baseline), (held(), baseline)
    finally:
        redray.shutdown()
        for started in nodes:
            started.stop()
            node_mod.remove_session_dir(started.session_dir)
        gcs.close()
        server.stop()
