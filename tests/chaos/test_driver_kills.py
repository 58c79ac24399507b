"""A driver SIGKILLed with work in flight: what it held is freed (its objects leave the
store, its running tasks' workers are stopped, its CPUs return), as `redray status` and the
node's processes show.

Expected to pass today.
"""

from __future__ import annotations

import signal
import time

import psutil
import pytest

from chaos.harness import Cluster, Node, alive, wait_for, wait_mark, workers

pytestmark = pytest.mark.chaos

MIB = 1024 * 1024

VICTIM = """
import json, os, sys, time
import numpy as np
import redray

url, marks = sys.argv[1], sys.argv[2]
redray.init(address=url)
MIB = 1024 * 1024
held = [redray.put(np.full(50 * MIB, i, dtype=np.uint8)) for i in range(2)]


@redray.remote
def make():
    return np.ones(50 * MIB, dtype=np.uint8)


@redray.remote
def hold():
    open(os.path.join(marks, f"holder-{os.getpid()}"), "w").close()
    while True:
        time.sleep(0.05)


made = make.remote()
redray.wait([made], timeout=60)
holders = [hold.remote() for _ in range(2)]
open(os.path.join(marks, "stored"), "w").close()
while True:
    time.sleep(1)
"""

AFTER = """
import json, sys, time
import redray

redray.init(address=sys.argv[1])


@redray.remote
def both(i):
    time.sleep(0.2)
    return i


print(json.dumps(redray.get([both.remote(i) for i in range(2)], timeout=60)))
"""


def store_used(cluster: Cluster, node: Node) -> float:
    """Bytes used in node's store, as `redray status` shows it (NaN when not reported)."""
    return cluster.status()["store_used"].get(node.node_id[:12], (float("nan"),))[0]


@pytest.mark.timeout(90)
def test_sigkilled_driver_frees_its_objects_workers_and_cpus(cluster: Cluster) -> None:
    head = cluster.start_head(num_cpus=2)
    pool = wait_for(lambda: workers(head.process), 20, "the node never started its workers")
    wait_for(lambda: len(workers(head.process)) == len(pool), 20, "the pool never settled")
    pool_pids = {p.pid for p in workers(head.process)}
    store_before = wait_for(  # (NaN until the node's first heartbeat reports its store)
        lambda: [u for u in [store_used(cluster, head)] if u == u],
        10,
        "the store's use never showed",
    )[0]

    marks = cluster.tmp / "marks"
    marks.mkdir()
    victim = cluster.driver(VICTIM, cluster.url, str(marks))
    wait_mark(marks / "stored", 60, victim)
    wait_for(lambda: len(list(marks.glob("holder-*"))) == 2, 30, "the holders never ran")
    holders = [psutil.Process(int(p.name.split("-")[1])) for p in marks.glob("holder-*")]
    during = wait_for(
        lambda: store_used(cluster, head) >= 150 * MIB,
        10,
        "the objects never showed in the store",
        interval=0.2,
    )
    assert during and cluster.status()["cpu_used"] == 2.0

    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait()
    killed_at = time.monotonic()
    wait_for(lambda: not any(alive(h) for h in holders), 10, "the dead driver's tasks still run")
    wait_for(
        lambda: store_used(cluster, head) == store_before,
        15,
        lambda: "the dead driver's objects were never freed:\n" + cluster.status()["text"],
        interval=0.2,
    )
    wait_for(
        lambda: cluster.status()["cpu_used"] == 0.0,
        10,
        "the dead driver's CPUs were never returned",
        interval=0.2,
    )
    print(f"objects, workers and CPUs freed {time.monotonic() - killed_at:.1f} s after the kill")
    assert len(workers(head.process)) <= len(pool_pids), "workers leaked past the pool"
    # The node is as usable as before: both CPUs at once.
    assert cluster.driver(AFTER, cluster.url).result(timeout=60) == [0, 1]
    # Its idle pool is back to the size it keeps (one worker per CPU), the dead driver's
    # workers replaced.
    wait_for(
        lambda: len(workers(head.process)) == len(pool_pids),
        15,
        lambda: f"the pool has {len(workers(head.process))} workers, not {len(pool_pids)}",
    )
