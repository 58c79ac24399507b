"""`get_runtime_context()` in drivers and tasks, and task output forwarded to the driver."""

from __future__ import annotations

import os

import pytest
from conftest import last_json, run_driver

import redray


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
    }


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
    assert ctx.get()["job_id"] == ray_start["job_id"]
    assert ctx.get()["task_id"] is None


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
    assert info["get"]["task_id"] == info["task_id"]
    assert info["get"]["job_id"] == driver.get_job_id()


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
