"""A node's raylet SIGKILLed mid-run in a three-node cluster on one machine (127.0.0.1/.2/.3):
its workers die with it, its tasks run again elsewhere, the run finishes.

Expected to pass today.
"""

from __future__ import annotations

import signal
import time

import pytest

from chaos.harness import Cluster, alive, lines, wait_for, wait_mark, workers

pytestmark = pytest.mark.chaos

TASKS = 200

DRIVER = """
import json, os, sys, time
import redray

url, marks, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
redray.init(address=url, _node_ip_address="127.0.0.1")

@redray.remote(resources={"work": 1}, scheduling_strategy="SPREAD")
def square(i):
    node = redray.get_runtime_context().get_node_id()
    open(os.path.join(marks, "ran-on-" + node), "a").close()
    with open(os.path.join(marks, "attempts"), "a") as f:
        f.write(f"{i} {node}\\n")
    time.sleep(0.05)
    return [i, i * i, node]

results = redray.get([square.remote(i) for i in range(count)], timeout=120)
print(json.dumps(results))
"""


@pytest.mark.timeout(120)
def test_sigkilled_raylet_tasks_rerun_on_other_nodes(cluster: Cluster) -> None:
    cluster.start_head("127.0.0.1", num_cpus=1)
    victim = cluster.add_node("127.0.0.2", num_cpus=2, resources={"work": 100})
    survivor = cluster.add_node("127.0.0.3", num_cpus=2, resources={"work": 100})
    cluster.wait_alive(3)
    marks = cluster.tmp / "marks"
    marks.mkdir()
    driver = cluster.driver(DRIVER, cluster.url, str(marks), str(TASKS))
    wait_mark(marks / f"ran-on-{victim.node_id}", 60, driver)
    victim_workers = workers(victim.process)
    assert victim_workers, "the victim runs tasks, so it has workers"
    victim.process.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()

    results = driver.result(timeout=90)
    finished = time.monotonic() - killed_at
    assert [r[:2] for r in results] == [[i, i * i] for i in range(TASKS)]
    assert {r[2] for r in results} <= {victim.node_id, survivor.node_id}
    started_on_victim = {
        int(i)
        for i, node in (line.split() for line in lines(marks / "attempts"))
        if node == victim.node_id
    }
    rerun = [r[0] for r in results if r[0] in started_on_victim and r[2] == survivor.node_id]
    assert rerun, "no task that was running on the killed node was run again elsewhere"
    wait_for(
        lambda: cluster.status()["nodes"].get(victim.node_id) == "DEAD",
        15,
        "the killed node was never declared dead",
        interval=0.2,
    )
    declared_dead = time.monotonic() - killed_at
    print(f"run finished {finished:.1f} s after the kill; node dead after <= {declared_dead:.1f} s")
    state = cluster.status()
    assert state["alive"] == 2 and state["dead"] == 1, state["text"]
    # Its workers die with their raylet: no orphan keeps a CPU or a lease.
    wait_for(lambda: not any(alive(w) for w in victim_workers), 10, "orphaned workers")
