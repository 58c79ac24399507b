"""`get_runtime_context()` in drivers, tasks and actors (compared with what Ray 2.60 gives in
each), and task output forwarded to the driver."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from conftest import last_json, run_driver, wait_for

import redray
from redray.core.ids import ActorID, JobID, NodeID, TaskID
from redray.exceptions import RayActorError


@redray.remote
def context_in_task():
    ctx = redray.get_runtime_context()
    return {
        "job_id": ctx.get_job_id(),
        "task_id": ctx.get_task_id(),
        "node_id": ctx.get_node_id(),
        "worker_id": ctx.get_worker_id(),
        "actor_id": ctx.get_actor_id(),
        "resources": ctx.get_assigned_resources(),
        "pid": os.getpid(),
        "get": ctx.get(),
        "task_name": ctx.get_task_name(),
        "function_name": ctx.get_task_function_name(),
        "actor_name": ctx.get_actor_name(),
        "ids": [ctx.job_id, ctx.node_id, ctx.task_id, ctx.actor_id],
    }


def describe_context() -> dict:
    """The same as context_in_task, from wherever it is called (a method of an actor)."""
    return context_in_task._function()


@redray.remote
class ContextProbe:
    def __init__(self):
        self.reconstructed_at_init = redray.get_runtime_context().was_current_actor_reconstructed

    def context(self) -> dict:
        return describe_context()

    def restarts(self) -> tuple:
        ctx = redray.get_runtime_context()
        return self.reconstructed_at_init, ctx.was_current_actor_reconstructed, os.getpid()


@redray.remote
class AsyncContextProbe:
    async def context(self) -> dict:
        await asyncio.sleep(0)
        return describe_context()


@redray.remote
def nested_context():
    inner = redray.get(context_in_task.remote())
    return redray.get_runtime_context().get_task_id(), inner


def test_driver_context(ray_start):
    ctx = redray.get_runtime_context()
    assert ctx.get_job_id() == ray_start["job_id"]
    assert ctx.get_task_id() is None
    assert ctx.get_actor_id() is None
    assert ctx.get_node_id() == redray.nodes()[0]["NodeID"] == ray_start["node_id"]
    worker_id = ctx.get_worker_id()
    assert isinstance(worker_id, str) and int(worker_id, 16) >= 0
    # As Ray's: a driver has no task or actor id (absent from get(), not None).
    found = ctx.get()
    assert set(found) == {"job_id", "node_id", "namespace"}
    assert found["job_id"] == ctx.job_id == JobID.from_hex(ray_start["job_id"])
    assert found["node_id"] == ctx.node_id == NodeID.from_hex(ray_start["node_id"])
    assert found["namespace"] == ctx.namespace
    assert ctx.get_task_name() is None and ctx.get_task_function_name() is None
    assert ctx.get_actor_name() is None
    with pytest.raises(AssertionError):
        ctx.task_id  # noqa: B018 (Ray: only in a worker)


def test_task_context(ray_start):
    driver = redray.get_runtime_context()
    ref = context_in_task.remote()
    info = redray.get(ref)
    assert info["job_id"] == driver.get_job_id()
    assert info["task_id"] is not None
    assert info["task_id"] == ref.task_id().hex()
    assert info["node_id"] == redray.nodes()[0]["NodeID"]
    assert info["worker_id"] != driver.get_worker_id()
    assert info["actor_id"] is None
    assert set(info["get"]) == {"job_id", "node_id", "namespace", "task_id"}
    assert info["get"]["task_id"] == TaskID.from_hex(info["task_id"])
    assert info["get"]["job_id"] == JobID.from_hex(driver.get_job_id())
    assert info["ids"] == [
        JobID.from_hex(driver.get_job_id()),
        NodeID.from_hex(info["node_id"]),
        TaskID.from_hex(info["task_id"]),
        None,
    ]
    assert info["task_name"] == "context_in_task"
    assert info["function_name"] == "test_runtime_context.context_in_task"
    assert info["actor_name"] is None
    renamed = redray.get(context_in_task.options(name="renamed").remote())
    assert renamed["task_name"] == "renamed"
    assert renamed["function_name"] == "test_runtime_context.context_in_task"


@redray.remote
def accelerator_ids():
    return redray.get_runtime_context().get_accelerator_ids()


def test_accelerator_ids_are_keyed_by_rays_accelerator_names(ray_start):
    in_driver = redray.get_runtime_context().get_accelerator_ids()
    assert {"GPU", "TPU", "NPU", "HPU", "neuron_cores"} <= set(in_driver)
    assert all(ids == [] for ids in in_driver.values())
    assert redray.get(accelerator_ids.remote()) == in_driver


def test_each_task_has_its_own_id(ray_start):
    infos = redray.get([context_in_task.remote() for _ in range(6)])
    assert len({i["task_id"] for i in infos}) == 6
    # A worker id names its process: same pid, same worker id, and vice versa.
    by_pid = {}
    for info in infos:
        by_pid.setdefault(info["pid"], set()).add(info["worker_id"])
    assert all(len(ids) == 1 for ids in by_pid.values())
    assert len({next(iter(ids)) for ids in by_pid.values()}) == len(by_pid)


def test_nested_task_context(ray_start):
    outer_task_id, inner = redray.get(nested_context.remote())
    assert outer_task_id and inner["task_id"] and outer_task_id != inner["task_id"]
    assert inner["job_id"] == redray.get_runtime_context().get_job_id()


@pytest.mark.parametrize(
    "options, expected",
    [
        ({}, {"CPU": 1.0}),
        ({"num_cpus": 2}, {"CPU": 2.0}),
        ({"num_cpus": 0.5}, {"CPU": 0.5}),
        ({"num_cpus": 0}, {}),
    ],
)
def test_assigned_resources(ray_start, options, expected):
    info = redray.get(context_in_task.options(**options).remote(), timeout=30)
    assert info["resources"] == expected


# -- actors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("probe", [ContextProbe, AsyncContextProbe], ids=["sync", "async"])
def test_actor_context(ray_start, probe):
    actor = probe.remote()
    ref = actor.context.remote()
    info = redray.get(ref, timeout=30)
    actor_hex = actor._actor_id_hex
    assert info["actor_id"] == actor_hex
    assert info["task_id"] == ref.task_id().hex()
    assert set(info["get"]) == {"job_id", "node_id", "namespace", "task_id", "actor_id"}
    assert info["get"]["actor_id"] == ActorID.from_hex(actor_hex)
    assert info["get"]["task_id"] == TaskID.from_hex(info["task_id"])
    assert info["ids"][2:] == [TaskID.from_hex(info["task_id"]), ActorID.from_hex(actor_hex)]
    name = probe.__name__
    assert info["task_name"] == f"{name}.context"
    assert info["function_name"] == f"test_runtime_context.{name}.context"
    assert info["actor_name"] == ""  # an actor without a name (None outside actors)
    assert info["resources"] == {}  # an actor holds no CPU while it runs, by default
    named = probe.options(name="context-probe", num_cpus=2).remote()
    info = redray.get(named.context.remote(), timeout=30)
    assert info["actor_name"] == "context-probe"
    assert info["resources"] == {"CPU": 2.0}
    redray.kill(named)


def test_actor_gpus_are_its_own(ray_start_gpu_custom):
    actor = ContextProbe.options(num_cpus=1, num_gpus=1, resources={"custom": 1}).remote()
    info = redray.get(actor.context.remote(), timeout=30)
    assert info["resources"] == {"CPU": 1.0, "GPU": 1.0, "custom": 1.0}

    @redray.remote(num_gpus=1)
    class GpuUser:
        def __init__(self):
            self.at_init = os.environ.get("CUDA_VISIBLE_DEVICES")

        def gpus(self):
            return redray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"), self.at_init

    ids, visible, at_init = redray.get(GpuUser.remote().gpus.remote(), timeout=30)
    assert len(ids) == 1 and visible == at_init == str(ids[0])


def test_was_current_actor_reconstructed(ray_start):
    actor = ContextProbe.options(max_restarts=1).remote()
    at_init, now, pid = redray.get(actor.restarts.remote(), timeout=30)
    assert (at_init, now) == (False, False)
    os.kill(pid, signal.SIGKILL)

    def restarted() -> tuple | None:
        try:
            found = redray.get(actor.restarts.remote(), timeout=30)
        except RayActorError:
            return None  # sent to the dead process before its death was known
        return found if found[2] != pid else None

    at_init, now, _ = wait_for(restarted, timeout=30, message="the actor never restarted")
    assert (at_init, now) == (True, True)


# -- logs ---------------------------------------------------------------------------------------
LOG_DRIVER = """
    import json, os, sys, time
    import redray


    class Tee:
        def __init__(self, stream):
            self.stream, self.seen = stream, []

        def write(self, text):
            self.seen.append(text)
            return self.stream.write(text)

        def flush(self):
            self.stream.flush()

        def __getattr__(self, name):
            return getattr(self.stream, name)


    sys.stdout, sys.stderr = Tee(sys.stdout), Tee(sys.stderr)
    ctx = redray.init(num_cpus=2, namespace="logs-ns", log_to_driver=LOG_TO_DRIVER)

    @redray.remote
    def chatty(tag):
        print(f"out line {tag}")
        print(f"err line {tag}", file=sys.stderr)
        print("first of two\\nsecond of two")
        print("no newline at the end", end="")
        return os.getpid()

    @redray.remote
    def nested():
        return redray.get(chatty.options(name="inner").remote("nested"))

    pids = {
        "plain": redray.get(chatty.remote("a")),
        "renamed": redray.get(chatty.options(name="renamed").remote("b")),
        "nested": redray.get(nested.remote()),
    }
    expected = f"(inner pid={pids['nested']}) out line nested"
    deadline = time.monotonic() + 3
    while LOG_TO_DRIVER and time.monotonic() < deadline:
        if expected in "".join(sys.stdout.seen):
            break
        time.sleep(0.01)
    print(json.dumps({"pids": pids, "namespace": redray.get_runtime_context().namespace}))
    redray.shutdown()
"""


@pytest.fixture(scope="module")
def log_run(tmp_path_factory):
    """One driver whose tasks print; its captured stdout/stderr and the tasks' pids."""
    tmp = tmp_path_factory.mktemp("logs")
    proc = run_driver(LOG_DRIVER.replace("LOG_TO_DRIVER", "True"), env={"TMPDIR": str(tmp)})
    result = last_json(proc.stdout)
    return {
        "out": proc.stdout.splitlines(),
        "err": proc.stderr.splitlines(),
        **result["pids"],
        "namespace": result["namespace"],
    }


def test_task_output_is_prefixed_on_the_driver(log_run):
    plain, renamed, out, err = log_run["plain"], log_run["renamed"], log_run["out"], log_run["err"]
    assert log_run["namespace"] == "logs-ns"
    assert f"(chatty pid={plain}) out line a" in out
    assert f"(chatty pid={plain}) err line a" in err
    assert f"(chatty pid={plain}) first of two" in out
    assert f"(chatty pid={plain}) second of two" in out
    assert f"(chatty pid={plain}) no newline at the end" in out
    assert f"(renamed pid={renamed}) out line b" in out
    assert not any("out line" in line for line in err)
    assert not any("err line" in line for line in out)


def test_multi_line_print_adds_no_blank_line(log_run):
    plain = log_run["plain"]
    assert f"(chatty pid={plain}) " not in log_run["out"]


def test_nested_task_output_reaches_the_driver(log_run):
    assert f"(inner pid={log_run['nested']}) out line nested" in log_run["out"]


def test_log_to_driver_false_keeps_output_off_the_driver(tmp_path):
    proc = run_driver(LOG_DRIVER.replace("LOG_TO_DRIVER", "False"), env={"TMPDIR": str(tmp_path)})
    assert last_json(proc.stdout)["namespace"] == "logs-ns"
    assert "out line" not in proc.stdout
    assert "err line" not in proc.stderr
