"""The state API (`redray.util.state`) on a two-node cluster: every list/get/summary, every
filter form, limits and detail, objects and workers gathered from each node, logs fetched
from another node through its raylet."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
from conftest import wait_for
from test_multinode import LocalCluster

import redray
from redray.util import placement_group, remove_placement_group, state
from redray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from redray.util.state import RayStateApiException


@pytest.fixture(scope="module")
def two_nodes():
    cluster = LocalCluster()
    cluster.add_node("127.0.0.1", 1, head=True)
    cluster.add_node("127.0.0.2", 2, resources={"node2": 2})
    cluster.wait_nodes(2)
    redray.init(address=cluster.url, _node_ip_address="127.0.0.1")
    yield cluster
    cluster.shutdown()


@redray.remote
class Greeter:
    def hello(self, who):
        print(f"hello {who} from node2", flush=True)
        return redray.get_runtime_context().get_node_id()

    def hold(self):
        self.kept = redray.put(b"held by the actor" * 100)
        return len(b"held by the actor" * 100)


@redray.remote
def triple(x):
    return 3 * x


@pytest.fixture(scope="module")
def scene(two_nodes):
    """What every test looks at: a named actor on node2, finished tasks, a group, a put."""
    actor = Greeter.options(name="greeter", resources={"node2": 1}).remote()
    node2 = redray.get(actor.hello.remote("tests"))
    redray.get(actor.hold.remote())
    assert redray.get([triple.remote(i) for i in range(4)]) == [0, 3, 6, 9]
    pg = placement_group([{"CPU": 0.5}], name="state-pg")
    assert pg.wait(10)
    ref = redray.put(b"x" * 5000)
    wait_for(lambda: len(state.list_tasks(filters=[("name", "=", "triple")])) == 4)
    yield {"actor": actor, "node2": node2, "pg": pg, "ref": ref}
    remove_placement_group(pg)


def test_list_and_get_actors(scene):
    actor_id = scene["actor"]._actor_id.hex()
    (listed,) = state.list_actors(filters=[("name", "=", "greeter")])
    assert (
        listed.actor_id == actor_id and listed.state == "ALIVE" and listed.class_name == "Greeter"
    )
    assert listed.node_id == scene["node2"] and listed.pid
    assert listed["ray_namespace"] == redray.get_runtime_context().namespace
    assert listed.required_resources is None  # a detail field
    detailed = state.get_actor(actor_id)
    assert detailed.required_resources and detailed.is_detached is False
    assert state.get_actor("00" * 16) is None
    assert state.list_actors(filters=[("state", "!=", "ALIVE"), ("name", "=", "greeter")]) == []
    assert state.list_actors(filters=[("state", "=", "alive")])  # states: any case


def test_list_and_get_nodes(scene, two_nodes):
    nodes = state.list_nodes()
    assert {n.node_ip for n in nodes} == {"127.0.0.1", "127.0.0.2"}
    (head,) = state.list_nodes(filters=[("is_head_node", "=", True)])
    assert head.node_ip == "127.0.0.1" and head.state == "ALIVE"
    assert state.list_nodes(filters=[("node_ip", "!=", "127.0.0.1")])[0].node_id == scene["node2"]
    node = state.get_node(scene["node2"])
    assert node.resources_total["node2"] == 2.0 and node.start_time_ms


def test_list_and_get_jobs(scene):
    job_id = redray.get_runtime_context().get_job_id()
    (job,) = state.list_jobs(filters=[("job_id", "=", job_id)])
    assert job.status == "RUNNING" and job.type == "DRIVER" and job.driver_info["pid"]
    assert state.get_job(job_id).start_time


def test_list_and_get_placement_groups(scene):
    pg_id = scene["pg"].id.hex()
    (listed,) = state.list_placement_groups(filters=[("name", "=", "state-pg")], detail=True)
    assert listed.placement_group_id == pg_id and listed.state == "CREATED"
    assert listed.bundles[0]["unit_resources"] == {"CPU": 0.5}
    assert (
        state.get_placement_group(pg_id).creator_job_id == redray.get_runtime_context().get_job_id()
    )


def test_workers_of_every_node(scene):
    workers = state.list_workers(detail=True)
    assert {w.node_id for w in workers} >= {scene["node2"]}
    (driver,) = state.list_workers(filters=[("worker_type", "=", "DRIVER")])
    assert driver.is_alive
    actor = state.get_actor(scene["actor"]._actor_id.hex())
    (actor_worker,) = state.list_workers(filters=[("pid", "=", actor.pid)])
    assert state.get_worker(actor_worker.worker_id).node_id == scene["node2"]


def test_objects_gathered_from_every_process(scene):
    ref_id = scene["ref"].hex()
    (mine,) = state.get_objects(ref_id)
    assert mine.object_size >= 5000 and mine.reference_type == "LOCAL_REFERENCE"
    assert mine.type == "DRIVER" and mine.ip == "127.0.0.1"
    held = state.list_objects(filters=[("ip", "=", "127.0.0.2"), ("type", "=", "WORKER")])
    assert any((o.object_size or 0) >= 1700 for o in held)  # the actor's put, on node2
    summary = state.summarize_objects()["cluster"]
    assert summary["total_objects"] >= 2 and summary["callsite_enabled"] is False


def test_tasks_filters_limit_detail_and_summary(scene):
    tasks = state.list_tasks(filters=[("name", "=", "triple")])
    assert len(tasks) == 4 and {t.state for t in tasks} == {"FINISHED"}
    assert all(t.events is None for t in tasks)
    assert state.list_tasks(filters=[("name", "=", "triple"), ("state", "!=", "FINISHED")]) == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        two = state.list_tasks(filters=[("name", "=", "triple")], limit=2)
    assert len(two) == 2 and any("Limit last 2 entries (Total 4)" in str(w.message) for w in caught)
    detailed = state.list_tasks(filters=[("task_id", "=", tasks[0].task_id)], detail=True)
    assert detailed[0].events and detailed[0].end_time_ms
    on_node2 = state.list_tasks(filters=[("node_id", "=", scene["node2"])])
    assert {t.name for t in on_node2} >= {"Greeter.hello", "Greeter.hold"}
    summary = state.summarize_tasks()["cluster"]
    assert summary["summary"]["triple"]["state_counts"] == {"FINISHED": 4}
    assert summary["total_actor_tasks"] >= 2
    actors = state.summarize_actors()["cluster"]
    assert actors["summary"]["Greeter"]["state_counts"] == {"ALIVE": 1}


@redray.remote
def where():
    return redray.get_runtime_context().get_node_id()


def test_a_node_filter_returns_that_nodes_tasks_only(scene):
    # One function's tasks run on both nodes: stored together (one segment per function and
    # write), listed in both nodes' indexes, each node's filter must still keep its own.
    nodes = [n["NodeID"] for n in redray.nodes() if n["Alive"]]
    assert len(nodes) == 2
    ran = redray.get(
        [
            where.options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
            ).remote()
            for node in nodes * 6
        ]
    )
    assert sorted(set(ran)) == sorted(nodes)
    wait_for(lambda: len(state.list_tasks(filters=[("name", "=", "where")])) == 12)
    for node in set(ran):
        on_node = state.list_tasks(filters=[("node_id", "=", node)], limit=10_000)
        assert {t.node_id for t in on_node} == {node}
        assert sum(t.name == "where" for t in on_node) == ran.count(node)


def test_bad_filters_and_limits_are_refused_at_the_call():
    with pytest.raises(ValueError, match="not supported"):
        state.list_tasks(filters=[("colour", "=", "red")])
    with pytest.raises(ValueError, match="predicate"):
        state.list_actors(filters=[("state", ">", "ALIVE")])
    with pytest.raises(ValueError, match="limit"):
        state.list_nodes(limit=0)
    with pytest.raises(ValueError, match="tuple"):
        state.list_jobs(filters=["state=RUNNING"])


def test_records_read_like_rays(scene):
    task = state.list_tasks(filters=[("name", "=", "triple")], limit=1)[0]
    fields = [f.name for f in dataclasses.fields(task)]
    assert fields[:13] == [
        "task_id", "attempt_number", "name", "state", "job_id", "actor_id", "type",
        "func_or_class_name", "parent_task_id", "node_id", "worker_id", "worker_pid", "error_type",
    ]  # fmt: skip
    assert task["state"] == task.state


def test_logs_of_another_node_through_its_raylet(scene):
    actor_id = scene["actor"]._actor_id.hex()
    text = "".join(state.get_log(actor_id=actor_id))
    assert "hello tests from node2" in text
    listed = state.list_logs(node_id=scene["node2"])
    assert listed["raylet"] == ["raylet.log"] and listed["worker_out"]
    assert state.list_logs(node_ip="127.0.0.2", glob_filter="raylet*") == {"raylet": ["raylet.log"]}
    tail = "".join(state.get_log(node_id=scene["node2"], filename="raylet.log", tail=1))
    assert tail.count("\n") <= 1
    with pytest.raises(RayStateApiException, match="not a log file name"):
        list(state.get_log(node_id=scene["node2"], filename="../../etc/passwd"))
