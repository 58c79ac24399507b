"""The head fails: its raylet is SIGKILLed, or its control loop is frozen past its lease.

Nodes are 127.0.0.1 (the head), .2 and .3 on one machine, each a raylet started with the
`redray` command. A standby head is `redray start --head --redis URL` on the cluster's
Redis; the head started first holds the control loop's lease (the CLI says the second is a
standby), renewed every half second with a 3 s lease.

test_head_sigkill_leaves_redis_and_nodes_running_and_a_new_head_takes_over: the Redis that
`redray start --head` runs is its own process (not a child of the raylet), so it survives the
head, and a head started later on that Redis takes over.

Behaviour these tests define that is expected to land (they fail until it does):
- test_leader_frozen_past_its_lease_does_not_restart_an_actor_twice: a leader that lost
  its lease (here: SIGSTOPped, then SIGCONTed) must not act on what it saw before; its
  writes are fenced by the lease holder and epoch, so an actor is restarted once, by the
  current leader only.
"""

from __future__ import annotations

import signal
import time

import psutil
import pytest

from chaos.harness import (
    Cluster,
    alive,
    answers_handshake,
    assert_stays,
    lines,
    port_of,
    redis_server_on,
    wait_for,
    wait_mark,
)

pytestmark = pytest.mark.chaos

ACTOR_CLASSES = """
import json, os, sys, time
import redray
from redray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@redray.remote
class Counter:
    def __init__(self, record=None):
        self.n = 0
        if record:
            with open(record, "a") as f:  # one line per incarnation
                f.write(f"{os.getpid()}\\n")

    def incr(self):
        self.n += 1
        return self.n

    def where(self):
        return [os.getpid(), redray.get_runtime_context().get_node_id()]
"""


# -- 6: the active head SIGKILLed while a standby head runs ---------------------------------------
FAILOVER_DRIVER = (
    ACTOR_CLASSES
    + """
url, marks, head_id, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
redray.init(address=url, namespace="chaos", _node_ip_address="127.0.0.3")
on_c = Counter.options(name="on_c", lifetime="detached", resources={"c": 1}).remote()
on_head = Counter.options(
    name="on_head",
    lifetime="detached",
    max_restarts=-1,
    scheduling_strategy=NodeAffinitySchedulingStrategy(head_id, soft=True),
).remote(os.path.join(marks, "on_head_incarnations"))
assert redray.get(on_c.incr.remote(), timeout=30) == 1
first_home = redray.get(on_head.where.remote(), timeout=30)


@redray.remote(scheduling_strategy="SPREAD")
def square(i):
    node = redray.get_runtime_context().get_node_id()
    open(os.path.join(marks, "ran-on-" + node), "a").close()
    time.sleep(0.02)
    return [i, i * i]


results = redray.get([square.remote(i) for i in range(count)], timeout=120)
open(os.path.join(marks, "tasks-done"), "w").close()
while not os.path.exists(os.path.join(marks, "head-gone")):
    time.sleep(0.01)
# After the failover: the detached actors answer, new actors can be made.
on_c_count = redray.get(redray.get_actor("on_c").incr.remote(), timeout=60)
deadline = time.monotonic() + 60
while True:
    try:
        second_home = redray.get(redray.get_actor("on_head").where.remote(), timeout=10)
        break
    except redray.exceptions.RayActorError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
fresh = redray.get(Counter.remote().incr.remote(), timeout=60)
print(json.dumps({
    "results": results, "on_c": on_c_count, "first_home": first_home,
    "second_home": second_home, "fresh": fresh,
}))
"""
)


@pytest.mark.timeout(150)
def test_active_head_sigkill_standby_takes_over_nothing_lost(cluster: Cluster) -> None:
    cluster.start_redis()
    active = cluster.start_head("127.0.0.1", num_cpus=1, redis_url=cluster.url)
    standby = cluster.start_head("127.0.0.2", num_cpus=1, redis_url=cluster.url)
    assert "standby" in standby.output, standby.output
    worker_node = cluster.add_node("127.0.0.3", num_cpus=2, resources={"c": 2})
    cluster.wait_alive(3)
    marks = cluster.tmp / "marks"
    marks.mkdir()
    tasks = 300
    driver = cluster.driver(FAILOVER_DRIVER, cluster.url, str(marks), active.node_id, str(tasks))
    wait_mark(marks / f"ran-on-{active.node_id}", 60, driver)
    active.process.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    wait_mark(marks / "tasks-done", 90, driver)
    (marks / "head-gone").touch()
    out = driver.result(timeout=120)
    print(
        f"tasks, actors and a new actor all done {time.monotonic() - killed_at:.1f} s after the kill"
    )

    assert out["results"] == [[i, i * i] for i in range(tasks)]
    assert out["on_c"] == 2  # lived through the failover with its state
    assert out["first_home"][1] == active.node_id
    assert out["second_home"][1] in (standby.node_id, worker_node.node_id)
    incarnations = lines(marks / "on_head_incarnations")
    assert len(incarnations) == 2, incarnations  # restarted once, by the new leader
    assert out["fresh"] == 1
    wait_for(
        lambda: cluster.status()["nodes"].get(active.node_id) == "DEAD",
        15,
        "the killed head was never declared dead",
        interval=0.2,
    )


# -- 5: the leader frozen (SIGSTOP) past its lease while an actor dies ---------------------------
CREATE_RECORDER = (
    ACTOR_CLASSES
    + """
url, record = sys.argv[1], sys.argv[2]
redray.init(address=url, namespace="chaos", _node_ip_address="127.0.0.3")
recorder = Counter.options(
    name="recorder", lifetime="detached", max_restarts=-1, max_task_retries=-1,
    resources={"c": 1},
).remote(record)
print(json.dumps(redray.get(recorder.where.remote(), timeout=30)))
"""
)

CALL_RECORDER = """
import json, sys
import redray
redray.init(address=sys.argv[1], namespace="chaos", _node_ip_address="127.0.0.3")
recorder = redray.get_actor("recorder")
print(json.dumps([redray.get(recorder.where.remote(), timeout=30), redray.get(recorder.incr.remote(), timeout=30)]))
"""


@pytest.mark.timeout(120)
def test_leader_frozen_past_its_lease_does_not_restart_an_actor_twice(cluster: Cluster) -> None:
    # Pausing the leader for longer than its lease but less than the node timeout: it is
    # replaced as leader, not declared dead.
    cluster.env["REDRAY_NODE_TIMEOUT"] = "15"
    cluster.start_redis()
    leader = cluster.start_head("127.0.0.1", num_cpus=1, redis_url=cluster.url)
    standby = cluster.start_head("127.0.0.2", num_cpus=1, redis_url=cluster.url)
    assert "standby" in standby.output, standby.output
    worker_node = cluster.add_node("127.0.0.3", num_cpus=2, resources={"c": 2})
    cluster.wait_alive(3)
    record = cluster.tmp / "incarnations"
    pid, node = cluster.driver(CREATE_RECORDER, cluster.url, str(record)).result(timeout=60)
    assert node == worker_node.node_id and lines(record) == [str(pid)]
    first = psutil.Process(pid)

    leader.process.send_signal(signal.SIGSTOP)
    try:
        first.send_signal(signal.SIGKILL)
        stopped_at = time.monotonic()
        # The standby takes the lease once it expires, and restarts the actor.
        wait_for(lambda: len(lines(record)) >= 2, 30, "the standby never restarted the actor")
        print(f"the standby restarted the actor {time.monotonic() - stopped_at:.1f} s after")
    finally:
        leader.process.send_signal(signal.SIGCONT)
    wait_for(lambda: answers_handshake(leader.ip, leader.port), 10, "the old leader is stuck")
    # Whatever the old leader saw before it froze (the actor's death) is stale now.
    assert_stays(
        lambda: len(lines(record)) == 2,
        4.0,
        lambda: f"the actor was restarted more than once: incarnations {lines(record)}",
    )
    (second_pid, second_node), count = cluster.driver(CALL_RECORDER, cluster.url).result(60)
    assert second_pid == int(lines(record)[1]) and second_node == worker_node.node_id
    assert count == 1  # a restarted actor starts from its constructor
    assert cluster.status()["dead"] == 0


# -- 7: the head SIGKILLed with no standby: Redis and the nodes live on, a new head takes over ----
HEADLESS_DRIVER = (
    ACTOR_CLASSES
    + """
url, marks, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
redray.init(address=url, namespace="chaos", _node_ip_address="127.0.0.2")
keeper = Counter.options(name="keeper", lifetime="detached", resources={"w": 1}).remote()
assert redray.get(keeper.incr.remote(), timeout=30) == 1


@redray.remote(resources={"w": 1}, scheduling_strategy="SPREAD")
def square(i):
    open(os.path.join(marks, "started"), "a").close()
    time.sleep(0.02)
    return [i, i * i]


results = redray.get([square.remote(i) for i in range(count)], timeout=120)
while not os.path.exists(os.path.join(marks, "new-head")):
    time.sleep(0.01)
keeper_count = redray.get(redray.get_actor("keeper").incr.remote(), timeout=60)
fresh = redray.get(Counter.options(resources={"w": 1}).remote().incr.remote(), timeout=60)
print(json.dumps({"results": results, "keeper": keeper_count, "fresh": fresh}))
"""
)


@pytest.mark.timeout(150)
def test_head_sigkill_leaves_redis_and_nodes_running_and_a_new_head_takes_over(
    cluster: Cluster,
) -> None:
    head = cluster.start_head("127.0.0.1", num_cpus=1)
    node_b = cluster.add_node("127.0.0.2", num_cpus=2, resources={"w": 4})
    node_c = cluster.add_node("127.0.0.3", num_cpus=2, resources={"w": 4})
    cluster.wait_alive(3)
    redis_port = port_of(cluster.url)
    redis_proc = redis_server_on(redis_port)
    assert redis_proc is not None, f"no redis-server listens on {redis_port}"
    marks = cluster.tmp / "marks"
    marks.mkdir()
    tasks = 300
    driver = cluster.driver(HEADLESS_DRIVER, cluster.url, str(marks), str(tasks))
    wait_mark(marks / "started", 60, driver)
    head.process.send_signal(signal.SIGKILL)
    wait_for(lambda: not alive(head.process), 10, "the head survived SIGKILL")

    assert_stays(
        lambda: alive(redis_proc), 1.0, "Redis died with the head raylet (it is its child)"
    )
    new_head = cluster.start_head("127.0.0.1", num_cpus=1, redis_url=cluster.url)
    (marks / "new-head").touch()
    out = driver.result(timeout=120)
    assert out["results"] == [[i, i * i] for i in range(tasks)]
    assert out["keeper"] == 2
    assert out["fresh"] == 1
    wait_for(
        lambda: cluster.status()["nodes"].get(head.node_id) == "DEAD",
        15,
        "the killed head was never declared dead",
        interval=0.2,
    )
    nodes = cluster.status()["nodes"]
    for survivor in (node_b, node_c, new_head):
        assert nodes.get(survivor.node_id) == "ALIVE", nodes
