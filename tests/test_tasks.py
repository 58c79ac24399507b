"""Remote functions on a real cluster: options, retries, worker crashes, cancellation,
resources and scheduling. Worker processes are real and really get SIGKILLed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
from conftest import REPO, block_until, count_lines, last_json, mark, run_driver, wait_for

import redray
from redray.exceptions import (
    RayTaskError,
    TaskCancelledError,
    TaskUnschedulableError,
    WorkerCrashedError,
)
from redray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


# -- remote functions used below -------------------------------------------------------------
@redray.remote
def echo(x):
    return x


@redray.remote
def add(a, b=0):
    return a + b


def note_attempt(attempts_file: str) -> int:
    with open(attempts_file, "a") as f:
        f.write(f"{os.getpid()}\n")
    return count_lines(attempts_file)


@redray.remote
def kill_self_on_first_attempt(marker: str):
    if not os.path.exists(marker):
        mark(marker)
        os.kill(os.getpid(), signal.SIGKILL)
    return "second attempt"


@redray.remote
def report_pid_and_block(attempts_file: str, pid_file: str, release_file: str):
    attempt = note_attempt(attempts_file)
    if attempt == 1:
        mark(pid_file, str(os.getpid()))
        block_until(release_file)
    return ("finished", attempt)


@redray.remote
def die_n_times(attempts_file: str, n: int):
    attempt = note_attempt(attempts_file)
    if attempt <= n:
        os.kill(os.getpid(), signal.SIGKILL)
    return attempt


@redray.remote
def fail_n_times(attempts_file: str, n: int, exc_type: type = ValueError):
    attempt = note_attempt(attempts_file)
    if attempt <= n:
        raise exc_type(f"attempt {attempt} fails")
    return attempt


@redray.remote
def blocker(started_file: str, release_file: str):
    mark(started_file, str(os.getpid()))
    return block_until(release_file)


@redray.remote
def side_effect(path: str, *deps):
    mark(path)
    return "ran"


@redray.remote
def interruptible(started_file: str, interrupted_file: str, release_file: str, attempts=None):
    if attempts:
        note_attempt(attempts)
    mark(started_file, str(os.getpid()))
    try:
        block_until(release_file)
    except KeyboardInterrupt:
        mark(interrupted_file)
        raise
    return "not interrupted"


@redray.remote
def parent_of_blocked_child(child_started: str, child_interrupted: str, child_done: str, release):
    @redray.remote
    def child():
        mark(child_started)
        try:
            block_until(release)
        except KeyboardInterrupt:
            mark(child_interrupted)
            raise
        mark(child_done)
        return "child finished"

    return redray.get(child.remote())


@redray.remote
def env_var(name: str):
    return os.environ.get(name)


@redray.remote
def where():
    ctx = redray.get_runtime_context()
    return {
        "node_id": ctx.get_node_id(),
        "resources": ctx.get_assigned_resources(),
        "gpu_ids": redray.get_gpu_ids(),
        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "pid": os.getpid(),
    }


@redray.remote
def gpu_holder(mark_file: str, release_file: str):
    mark(mark_file, os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    block_until(release_file)
    return redray.get_gpu_ids()


@redray.remote
def fib(n: int) -> int:
    if n < 2:
        return n
    return sum(redray.get([fib.remote(n - 1), fib.remote(n - 2)]))


# -- basics -------------------------------------------------------------------------------------
def test_remote_without_and_with_options(ray_start):
    @redray.remote(num_cpus=1, max_retries=0)
    def double(x):
        return 2 * x

    assert redray.get(echo.remote("hi")) == "hi"
    assert redray.get(double.remote(21)) == 42
    assert redray.get([add.remote(i, b=i) for i in range(20)]) == [2 * i for i in range(20)]


def test_many_small_tasks_are_fast(ray_start):
    """The hot path is direct TCP: a thousand tasks take well under the budget."""
    start = time.monotonic()
    assert redray.get([add.remote(i, b=1) for i in range(1000)], timeout=60) == list(range(1, 1001))
    assert time.monotonic() - start < 20


def test_options_override_per_call(ray_start):
    assert redray.get(add.options(name="adder", num_cpus=0.5).remote(1, 2)) == 3
    assert redray.get(where.options(num_cpus=2).remote())["resources"] == {"CPU": 2.0}
    # .options() does not change the function itself.
    assert redray.get(where.remote())["resources"] == {"CPU": 1.0}
    bound = where.options(resources={"CPU_like": 0}, num_cpus=0.5)
    assert [r["resources"] for r in redray.get([bound.remote(), bound.remote()])] == [
        {"CPU": 0.5}
    ] * 2


def test_calling_a_remote_function_directly_raises_type_error(ray_start):
    with pytest.raises(TypeError, match=r"echo\.remote\(\)"):
        echo(1)


@pytest.mark.parametrize(
    "options, error",
    [
        ({"num_cpus": -1}, ValueError),
        ({"num_gpus": "one"}, TypeError),
        ({"num_gpus": 1e-7}, ValueError),
        ({"not_an_option": 1}, ValueError),
        ({"num_returns": -1}, ValueError),
        ({"num_returns": "many"}, TypeError),
        ({"num_returns": 1.0}, TypeError),
        ({"max_retries": -2}, ValueError),
        ({"max_retries": 1.5}, TypeError),
        ({"max_retries": 0.5}, TypeError),
        ({"resources": {"CPU": 1}}, ValueError),
        ({"resources": {"custom": -1}}, ValueError),
        ({"resources": {"custom": 1e-5}}, ValueError),
        ({"resources": {"custom": "1"}}, TypeError),
        ({"resources": ["custom"]}, TypeError),
        ({"retry_exceptions": [1]}, ValueError),
        ({"retry_exceptions": [KeyboardInterrupt]}, ValueError),
        ({"retry_exceptions": "yes"}, TypeError),
        ({"retry_exceptions": None}, TypeError),
        ({"object_store_memory": 100}, ValueError),
        ({"enable_task_events": 1}, TypeError),
        ({"scheduling_strategy": "NOWHERE"}, ValueError),
        ({"scheduling_strategy": 3}, TypeError),
        ({"runtime_env": {"conda": "env"}}, ValueError),
        ({"runtime_env": {"env_vars": {"A": 1}}}, TypeError),
        ({"runtime_env": "env"}, TypeError),
        ({"name": 3}, TypeError),
    ],
)
def test_bad_options_fail_where_written(options, error):
    """Bad options are reported at decoration and at .options() time, before any cluster,
    with Ray's error types (TypeError for a wrong type, ValueError for a wrong value)."""
    with pytest.raises(error):
        redray.remote(**options)(lambda: None)
    with pytest.raises(error):
        echo.options(**options)


@pytest.mark.parametrize("value, error", [(-1, ValueError), (0.5, TypeError), ("2", TypeError)])
def test_bad_max_calls_fails_where_written(value, error):
    with pytest.raises(error, match="max_calls"):
        redray.remote(max_calls=value)(lambda: None)


def test_max_calls_only_in_the_decorator():
    """As in Ray: max_calls belongs to the function, `.options()` cannot set it."""
    with pytest.raises(ValueError, match="max_calls"):
        echo.options(max_calls=2)


@pytest.mark.parametrize(
    "options",
    [{"num_cpus": True}, {"num_gpus": 0.0001}, {"max_retries": None}, {"num_returns": None}],
)
def test_options_ray_accepts_are_accepted(options):
    redray.remote(**options)(lambda: None)
    echo.options(**options)


def test_async_def_function_is_refused():
    async def coroutine():
        return 1

    with pytest.raises(ValueError, match="'async def' should not be used for remote tasks"):
        redray.remote(coroutine)
    with pytest.raises(ValueError, match="'async def'"):
        redray.remote(num_cpus=1)(coroutine)


def test_function_capturing_a_huge_object_is_refused_at_remote(ray_start, capfd):
    """Ray's limits: above 10 MB pickled a warning, from 100 MB a ValueError at `.remote()`."""
    huge = b"x" * (100 * 1024 * 1024)
    large = b"y" * (20 * 1024 * 1024)

    def uses_huge():
        return len(huge)

    def uses_large():
        return len(large)

    refused = redray.remote(uses_huge)
    with pytest.raises(ValueError, match="too large .*FUNCTION_SIZE_ERROR_THRESHOLD=95 MiB"):
        refused.remote()
    with pytest.raises(ValueError, match="uses_huge is too large"):
        refused.remote()  # still refused: nothing half-exported
    assert redray.get(redray.remote(uses_large).remote(), timeout=60) == len(large)
    err = capfd.readouterr().err
    assert "uses_large is very large (20 MiB)" in err


def test_remote_decorator_misuse():
    with pytest.raises(TypeError):
        redray.remote(1)
    with pytest.raises(TypeError):
        redray.remote(num_cpus=1)(42)


# -- num_returns ------------------------------------------------------------------------------
def test_num_returns(ray_start, tmp_path):
    @redray.remote(num_returns=3)
    def three():
        return 1, "two", [3]

    @redray.remote(num_returns=0)
    def nothing(path):
        mark(path)

    refs = three.remote()
    assert isinstance(refs, list) and len(refs) == 3
    assert all(isinstance(r, redray.ObjectRef) for r in refs)
    assert redray.get(refs) == [1, "two", [3]]
    assert redray.get(refs[2]) == [3]

    single = echo.options(num_returns=1).remote((1, 2))
    assert isinstance(single, redray.ObjectRef)
    assert redray.get(single) == (1, 2)

    a, b = echo.options(num_returns=2).remote(["x", "y"])
    assert redray.get([b, a]) == ["y", "x"]

    path = tmp_path / "ran"
    assert nothing.remote(str(path)) is None
    wait_for(path.exists, message="a num_returns=0 task did not run")


def test_num_returns_mismatch_is_an_error(ray_start):
    @redray.remote(num_returns=3)
    def two():
        return 1, 2

    refs = two.remote()
    for ref in refs:
        with pytest.raises(ValueError, match="num_returns"):
            redray.get(ref)


# -- arguments that cannot be sent ------------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "submit",
    [
        lambda: echo.remote(threading.Lock()),
        lambda: add.remote(1, b=threading.Lock()),
        lambda: echo.remote([1, {"k": threading.Lock()}]),
    ],
    ids=["positional", "keyword", "nested"],
)
def test_unpicklable_argument_fails_at_remote(ray_start, submit):
    with pytest.raises(TypeError) as info:
        submit()
    message = str(info.value)
    assert "lock" in message  # names what could not be pickled
    assert "serialize" in message.lower() or "pickle" in message.lower()
    # The cluster is unharmed.
    assert redray.get(echo.remote(1), timeout=20) == 1


@pytest.mark.timeout(30)
def test_unpicklable_return_value_is_a_task_error(ray_start):
    @redray.remote
    def returns_lock():
        return threading.Lock()

    with pytest.raises(TypeError, match="lock") as info:
        redray.get(returns_lock.remote(), timeout=20)
    assert isinstance(info.value, RayTaskError)
    assert redray.get(echo.remote(2), timeout=20) == 2


# -- worker crashes and retries --------------------------------------------------------------
@pytest.mark.timeout(60)
def test_sigkill_mid_task_without_retries_is_worker_crashed(ray_start, tmp_path):
    marker = str(tmp_path / "attempted")
    ref = kill_self_on_first_attempt.options(max_retries=0).remote(marker)
    with pytest.raises(WorkerCrashedError):
        redray.get(ref, timeout=30)
    assert os.path.exists(marker)


@pytest.mark.timeout(60)
def test_sigkill_mid_task_with_one_retry_gives_the_result(ray_start, tmp_path):
    marker = str(tmp_path / "attempted")
    ref = kill_self_on_first_attempt.options(max_retries=1).remote(marker)
    assert redray.get(ref, timeout=30) == "second attempt"


@pytest.mark.timeout(60)
def test_worker_killed_from_outside_loses_nothing(ray_start, gate):
    """SIGKILL a busy worker: its task is retried once; every other task still completes."""
    attempts = gate.path("attempts")
    ref = report_pid_and_block.options(max_retries=1).remote(
        attempts, gate.path("pid"), gate.release_file
    )
    others = [add.remote(i, b=1) for i in range(50)]
    pid = int(gate.wait_mark("pid"))
    os.kill(pid, signal.SIGKILL)
    assert redray.get(ref, timeout=30) == ("finished", 2)
    assert redray.get(others, timeout=30) == [i + 1 for i in range(50)]
    pids = open(attempts).read().split()
    assert len(pids) == 2 and pids[0] == str(pid) and pids[1] != str(pid)
    more = [add.remote(i, b=2) for i in range(50)]
    assert redray.get(more, timeout=30) == [i + 2 for i in range(50)]


@pytest.mark.timeout(60)
def test_worker_killed_from_outside_without_retries(ray_start, gate):
    ref = report_pid_and_block.options(max_retries=0).remote(
        gate.path("attempts"), gate.path("pid"), gate.release_file
    )
    os.kill(int(gate.wait_mark("pid")), signal.SIGKILL)
    with pytest.raises(WorkerCrashedError):
        redray.get(ref, timeout=30)
    assert count_lines(gate.path("attempts")) == 1


@pytest.mark.timeout(60)
def test_default_max_retries_is_three(ray_start, tmp_path):
    survives = tmp_path / "survives"
    assert redray.get(die_n_times.remote(str(survives), 3), timeout=30) == 4
    gives_up = tmp_path / "gives_up"
    with pytest.raises(WorkerCrashedError):
        redray.get(die_n_times.remote(str(gives_up), 4), timeout=30)
    assert count_lines(gives_up) == 4


def test_application_errors_are_not_retried_by_default(ray_start, tmp_path):
    attempts = tmp_path / "attempts"
    with pytest.raises(ValueError, match="attempt 1 fails"):
        redray.get(fail_n_times.remote(str(attempts), 10), timeout=30)
    assert count_lines(attempts) == 1


def test_retry_exceptions_true(ray_start, tmp_path):
    recovers = tmp_path / "recovers"
    ref = fail_n_times.options(retry_exceptions=True, max_retries=3).remote(str(recovers), 2)
    assert redray.get(ref, timeout=30) == 3
    exhausted = tmp_path / "exhausted"
    ref = fail_n_times.options(retry_exceptions=True, max_retries=1).remote(str(exhausted), 10)
    with pytest.raises(ValueError, match="attempt 2 fails"):
        redray.get(ref, timeout=30)
    assert count_lines(exhausted) == 2


def test_retry_exceptions_list_retries_only_matching(ray_start, tmp_path):
    retried = tmp_path / "retried"
    ref = fail_n_times.options(retry_exceptions=[KeyError, ValueError], max_retries=2).remote(
        str(retried), 1, ValueError
    )
    assert redray.get(ref, timeout=30) == 2
    not_retried = tmp_path / "not_retried"
    ref = fail_n_times.options(retry_exceptions=[ValueError], max_retries=2).remote(
        str(not_retried), 1, KeyError
    )
    with pytest.raises(KeyError):
        redray.get(ref, timeout=30)
    assert count_lines(not_retried) == 1


# -- cancellation ---------------------------------------------------------------------------
def occupy_all_cpus(gate, n: int = 2) -> list:
    refs = [blocker.remote(gate.path(f"blocker{i}"), gate.release_file) for i in range(n)]
    for i in range(n):
        gate.wait_mark(f"blocker{i}")
    return refs


@pytest.mark.timeout(60)
def test_cancel_queued_task_never_runs(ray_start, gate):
    blockers = occupy_all_cpus(gate)
    victim_file = gate.path("victim_ran")
    victim = side_effect.remote(victim_file)
    redray.cancel(victim)
    with pytest.raises(TaskCancelledError):
        redray.get(victim, timeout=10)
    gate.open()
    assert redray.get(blockers, timeout=30) == [True, True]
    # Later work of the same shape runs; the cancelled task does not come back.
    assert redray.get([side_effect.remote(gate.path(f"after{i}")) for i in range(4)]) == ["ran"] * 4
    assert not os.path.exists(victim_file)


@pytest.mark.timeout(60)
def test_cancel_task_waiting_for_its_arguments(ray_start, gate):
    """A task whose argument is not ready yet is cancelled at once, and never runs."""
    dependency = blocker.remote(gate.path("dep_started"), gate.release_file)
    victim_file = gate.path("victim_ran")
    victim = side_effect.remote(victim_file, dependency)
    redray.cancel(victim)
    try:
        with pytest.raises(TaskCancelledError):
            redray.get(victim, timeout=3)
    finally:
        gate.open()
    assert redray.get(dependency, timeout=30) is True
    assert redray.get(side_effect.remote(gate.path("after")), timeout=30) == "ran"
    assert not os.path.exists(victim_file)


@pytest.mark.timeout(60)
def test_cancel_running_task_interrupts_it(ray_start, gate):
    ref = interruptible.remote(gate.path("started"), gate.path("interrupted"), gate.release_file)
    pid = int(gate.wait_mark("started"))
    redray.cancel(ref)
    with pytest.raises(TaskCancelledError):
        redray.get(ref, timeout=30)
    gate.wait_mark("interrupted")  # the task saw KeyboardInterrupt
    assert psutil.pid_exists(pid)  # a plain cancel does not kill the worker
    assert redray.get(echo.remote("after"), timeout=30) == "after"


@pytest.mark.timeout(60)
def test_force_cancel_kills_the_worker(ray_start, gate):
    attempts = gate.path("attempts")
    ref = interruptible.options(max_retries=3).remote(
        gate.path("started"), gate.path("interrupted"), gate.release_file, attempts
    )
    pid = int(gate.wait_mark("started"))
    redray.cancel(ref, force=True)
    with pytest.raises(WorkerCrashedError):
        redray.get(ref, timeout=30)
    wait_for(lambda: not _running(pid), message="force-cancelled worker still alive")
    # Never retried, although max_retries=3 and the worker died.
    assert redray.get(echo.remote("after"), timeout=30) == "after"
    assert count_lines(attempts) == 1
    assert not os.path.exists(gate.path("interrupted"))


@pytest.mark.timeout(60)
def test_cancelled_task_is_not_retried_even_with_retry_exceptions(ray_start, gate):
    attempts = gate.path("attempts")
    ref = interruptible.options(max_retries=3, retry_exceptions=True).remote(
        gate.path("started"), gate.path("interrupted"), gate.release_file, attempts
    )
    gate.wait_mark("started")
    redray.cancel(ref)
    with pytest.raises(TaskCancelledError):
        redray.get(ref, timeout=30)
    assert redray.get(echo.remote("after"), timeout=30) == "after"
    assert count_lines(attempts) == 1


@pytest.mark.timeout(60)
def test_cancel_is_recursive_by_default(ray_start, gate):
    ref = parent_of_blocked_child.remote(
        gate.path("child_started"),
        gate.path("child_interrupted"),
        gate.path("child_done"),
        gate.release_file,
    )
    gate.wait_mark("child_started")
    redray.cancel(ref)
    with pytest.raises(TaskCancelledError):
        redray.get(ref, timeout=30)
    gate.wait_mark("child_interrupted")
    assert not os.path.exists(gate.path("child_done"))


@pytest.mark.timeout(60)
def test_cancel_not_recursive_leaves_children_running(ray_start, gate):
    ref = parent_of_blocked_child.remote(
        gate.path("child_started"),
        gate.path("child_interrupted"),
        gate.path("child_done"),
        gate.release_file,
    )
    gate.wait_mark("child_started")
    redray.cancel(ref, recursive=False)
    with pytest.raises(TaskCancelledError):
        redray.get(ref, timeout=30)
    gate.open()
    gate.wait_mark("child_done")
    assert not os.path.exists(gate.path("child_interrupted"))


def test_cancel_rejects_non_refs(ray_start):
    with pytest.raises(TypeError):
        redray.cancel("not a ref")


@redray.remote
def inner_of(started: str, release: str):
    mark(started)
    return block_until(release)


@redray.remote
def submit_inner(started: str, release: str):
    return [inner_of.remote(started, release)]


@pytest.mark.timeout(60)
def test_cancel_a_ref_another_worker_submitted(ray_start, gate):
    """The ref of a task a worker submitted is cancelled by its owner, on request."""
    (inner,) = redray.get(submit_inner.remote(gate.path("started"), gate.release_file))
    gate.wait_mark("started")
    redray.cancel(inner)
    with pytest.raises(TaskCancelledError):
        redray.get(inner, timeout=20)


@pytest.mark.timeout(60)
def test_cancel_a_queued_ref_another_worker_submitted(ray_start, gate):
    blockers = occupy_all_cpus(gate)
    try:
        (inner,) = redray.get(
            submit_inner.options(num_cpus=0).remote(gate.path("never"), gate.release_file),
            timeout=20,
        )
        redray.cancel(inner)
        with pytest.raises(TaskCancelledError):
            redray.get(inner, timeout=20)
    finally:
        gate.open()
    assert redray.get(blockers, timeout=30) == [True, True]
    assert not os.path.exists(gate.path("never"))


def test_cancel_finished_task_keeps_its_value(ray_start):
    ref = echo.remote(5)
    assert redray.get(ref) == 5
    redray.cancel(ref)
    assert redray.get(ref) == 5


@pytest.mark.timeout(90)
def test_ctrl_c_in_get_raises_keyboard_interrupt_and_the_driver_goes_on(tmp_path):
    """Ctrl-C while the driver waits in get() interrupts the wait (the driver's main thread
    runs the runtime's message loop meanwhile, so the interrupt must not land inside it):
    afterwards results still arrive, including the one that was being waited for."""
    release = tmp_path / "release"
    script = f"""
        import json, os, signal, redray
        from conftest import block_until
        redray.init(num_cpus=2)

        @redray.remote
        def interrupt_driver_then_wait(pid):
            os.kill(pid, signal.SIGINT)
            block_until({str(release)!r})
            return "released"

        @redray.remote
        def echo(x):
            return x

        ref = interrupt_driver_then_wait.remote(os.getpid())
        try:
            redray.get(ref, timeout=60)
            outcome = "not interrupted"
        except KeyboardInterrupt:
            outcome = "interrupted"
        open({str(release)!r}, "w").close()
        later = redray.get([echo.remote(i) for i in range(200)], timeout=60)
        print(json.dumps([outcome, later == list(range(200)), redray.get(ref, timeout=60)]))
        redray.shutdown()
    """
    path = os.pathsep.join([str(REPO / "tests"), str(REPO)])
    proc = run_driver(script, timeout=80, env={"PYTHONPATH": path})
    assert last_json(proc.stdout) == ["interrupted", True, "released"]


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- runtime_env, names, scheduling strategies ---------------------------------------------
def test_runtime_env_env_vars(ray_start):
    env = {"env_vars": {"REDRAY_TEST_VAR": "hello", "OTHER_VAR": "x=1"}}
    assert redray.get(env_var.options(runtime_env=env).remote("REDRAY_TEST_VAR")) == "hello"
    assert redray.get(env_var.options(runtime_env=env).remote("OTHER_VAR")) == "x=1"

    @redray.remote(runtime_env={"env_vars": {"REDRAY_TEST_VAR": "decorated"}})
    def decorated():
        return os.environ.get("REDRAY_TEST_VAR")

    assert redray.get(decorated.remote()) == "decorated"
    # Tasks without the runtime_env never see it (no leaking through reused workers).
    assert redray.get([env_var.remote("REDRAY_TEST_VAR") for _ in range(4)]) == [None] * 4


def test_name_option_in_log_prefix(ray_start, capfd):
    @redray.remote
    def chatty():
        print("hello from a named task")
        return os.getpid()

    pid = redray.get(chatty.options(name="my_named_task").remote())
    expected = f"(my_named_task pid={pid}) hello from a named task"
    seen = []

    def printed():
        seen.append(capfd.readouterr().out)
        return expected in "".join(seen)

    wait_for(printed, message=f"{expected!r} not in driver stdout: {''.join(seen)!r}")


@pytest.mark.parametrize("strategy", ["DEFAULT", "SPREAD", None])
def test_builtin_scheduling_strategies(ray_start, strategy):
    ref = where.options(scheduling_strategy=strategy).remote()
    assert redray.get(ref, timeout=30)["node_id"] == redray.nodes()[0]["NodeID"]


def test_node_affinity_to_the_node(ray_start):
    node_id = redray.nodes()[0]["NodeID"]
    strategy = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
    refs = [where.options(scheduling_strategy=strategy).remote() for _ in range(3)]
    assert [r["node_id"] for r in redray.get(refs, timeout=30)] == [node_id] * 3


def test_node_affinity_to_missing_node(ray_start):
    missing = "ab" * 16
    hard = NodeAffinitySchedulingStrategy(node_id=missing, soft=False)
    with pytest.raises(TaskUnschedulableError):
        redray.get(where.options(scheduling_strategy=hard).remote(), timeout=30)
    soft = NodeAffinitySchedulingStrategy(node_id=missing, soft=True)
    result = redray.get(where.options(scheduling_strategy=soft).remote(), timeout=30)
    assert result["node_id"] == redray.nodes()[0]["NodeID"]


def collect_stderr(capfd, needle: str) -> str:
    seen = []

    def found():
        seen.append(capfd.readouterr().err)
        return needle in "".join(seen)

    wait_for(found, message=f"{needle!r} never printed; stderr: {''.join(seen)!r}")
    return "".join(seen)


@pytest.mark.timeout(30)
def test_infeasible_task_warns_and_stays_pending(ray_start, capfd):
    ref = where.options(num_cpus=100).remote()
    try:
        err = collect_stderr(capfd, "cannot be scheduled")
        assert "CPU" in err and "100" in err
        ready, not_ready = redray.wait([ref], timeout=0.5)
        assert ready == [] and not_ready == [ref]
        # The rest of the cluster keeps working meanwhile.
        assert redray.get(echo.remote(1), timeout=10) == 1
    finally:
        redray.cancel(ref)
    with pytest.raises(TaskCancelledError):
        redray.get(ref, timeout=10)


@pytest.mark.timeout(60)
def test_infeasible_tasks_warn_once_per_shape():
    """Twenty tasks of one impossible shape: one warning line, and they stay pending."""
    proc = run_driver(
        """
        import json, sys, time, redray

        class Recorder:
            def __init__(self, stream):
                self.stream, self.text = stream, ""

            def write(self, text):
                self.text += text
                return self.stream.write(text)

            def __getattr__(self, name):
                return getattr(self.stream, name)

        sys.stderr = Recorder(sys.stderr)
        redray.init(num_cpus=1)

        @redray.remote(num_cpus=100)
        def impossible():
            return 1

        refs = [impossible.remote() for _ in range(20)]
        deadline = time.monotonic() + 30
        while "cannot be scheduled" not in sys.stderr.text and time.monotonic() < deadline:
            time.sleep(0.05)
        # Every request of the shape was made at once: others would have warned by now.
        ready, pending = redray.wait(refs, num_returns=1, timeout=2)
        print(json.dumps({"ready": len(ready), "pending": len(pending)}))
        """
    )
    assert last_json(proc.stdout) == {"ready": 0, "pending": 20}
    warnings = [line for line in proc.stderr.splitlines() if "cannot be scheduled" in line]
    assert len(warnings) == 1, proc.stderr


@pytest.mark.timeout(30)
def test_infeasible_custom_resource_names_it(ray_start, capfd):
    ref = where.options(resources={"unobtainium": 1}).remote()
    try:
        err = collect_stderr(capfd, "unobtainium")
        assert "cannot be scheduled" in err
        assert redray.wait([ref], timeout=0.2) == ([], [ref])
    finally:
        redray.cancel(ref)


# -- custom resources and GPUs ---------------------------------------------------------------
def test_cluster_resources_include_custom_and_gpus(ray_start_gpu_custom):
    total = redray.cluster_resources()
    assert total["CPU"] == 2.0 and total["GPU"] == 2.0 and total["custom"] == 2.0


def test_custom_resources_are_assigned(ray_start_gpu_custom):
    result = redray.get(where.options(resources={"custom": 1}).remote(), timeout=30)
    assert result["resources"] == {"CPU": 1.0, "custom": 1.0}


@pytest.mark.timeout(60)
def test_custom_resources_limit_concurrency(ray_start_gpu_custom, gate):
    first = blocker.options(resources={"custom": 2}).remote(gate.path("first"), gate.release_file)
    gate.wait_mark("first")
    second = side_effect.options(resources={"custom": 1}, num_cpus=0).remote(gate.path("second"))
    # A CPU is free, but all of "custom" is held: the second task waits.
    assert redray.wait([second], timeout=0.5) == ([], [second])
    assert not os.path.exists(gate.path("second"))
    gate.open()
    assert redray.get([first, second], timeout=30) == [True, "ran"]


def test_gpu_task_sees_its_gpu(ray_start_gpu_custom):
    result = redray.get(where.options(num_gpus=1).remote(), timeout=30)
    assert result["cuda"] in ("0", "1")
    assert result["gpu_ids"] == [int(result["cuda"])]
    assert result["resources"] == {"CPU": 1.0, "GPU": 1.0}
    both = redray.get(where.options(num_gpus=2).remote(), timeout=30)
    assert sorted(both["gpu_ids"]) == [0, 1]
    assert sorted(both["cuda"].split(",")) == ["0", "1"]


@pytest.mark.timeout(60)
def test_concurrent_gpu_tasks_get_different_gpus(ray_start_gpu_custom, gate):
    refs = [
        gpu_holder.options(num_gpus=1).remote(gate.path(f"gpu{i}"), gate.release_file)
        for i in range(2)
    ]
    seen = {gate.wait_mark("gpu0"), gate.wait_mark("gpu1")}
    assert seen == {"0", "1"}
    gate.open()
    assert sorted(sum(redray.get(refs, timeout=30), [])) == [0, 1]


def test_cpu_task_sees_no_gpu(ray_start_gpu_custom):
    redray.get([where.options(num_gpus=1).remote() for _ in range(4)], timeout=30)
    for result in redray.get([where.remote() for _ in range(4)], timeout=30):
        assert result["gpu_ids"] == []
        assert result["cuda"] in (None, "")


# -- max_calls ----------------------------------------------------------------------------------
@redray.remote(max_calls=2, max_retries=0)
def limited_pid(i):
    return os.getpid()


@pytest.mark.timeout(90)
def test_max_calls_replaces_the_worker(ray_start):
    """A worker that ran max_calls tasks of the function is replaced by a fresh process (as
    Ray's); no task is lost or failed on the way, even without retries."""
    pids = redray.get([limited_pid.remote(i) for i in range(20)], timeout=60)
    runs = {pid: pids.count(pid) for pid in pids}
    assert max(runs.values()) <= 2 and len(runs) >= 10
    for pid in (pid for pid, count in runs.items() if count == 2):
        wait_for(lambda p=pid: not _running(p), message=f"retired worker {pid} still runs")
    assert redray.get(echo.remote("after"), timeout=30) == "after"


# -- nested tasks -----------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_nested_fib_on_one_cpu(ray_start_1cpu):
    """Workers blocked in get lend their CPU back, so a recursion deeper than the CPUs ends."""
    assert redray.cluster_resources()["CPU"] == 1.0
    assert redray.get(fib.remote(10), timeout=80) == 55


# -- drivers as users run them -----------------------------------------------------------------
@pytest.mark.timeout(60)
def test_module_next_to_the_driver_script_is_importable(tmp_path):
    """As in Ray: a script run from another directory can use helpers beside it."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "helpers.py").write_text(
        textwrap.dedent(
            """
            class Point:
                def __init__(self, x, y):
                    self.x, self.y = x, y
            """
        )
    )
    (app / "main.py").write_text(
        textwrap.dedent(
            """
            import redray as ray
            from helpers import Point

            @ray.remote
            def norm2(p):
                return p.x * p.x + p.y * p.y

            ray.init(num_cpus=1)
            print("RESULT", ray.get(norm2.remote(Point(3, 4)), timeout=30))
            ray.shutdown()
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, str(app / "main.py")],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert "RESULT 25" in proc.stdout, proc.stderr[-3000:]


def test_actor_class_too_large_to_ship_is_refused_where_created(ray_start):
    big = bytes(100 * 1024 * 1024)

    @redray.remote
    class Captures:
        def size(self):
            return len(big)

    with pytest.raises(ValueError, match="actor .*Captures is too large"):
        Captures.remote()


def test_concurrency_groups_cannot_be_set_in_options(ray_start):
    @redray.remote
    class Grouped:
        def f(self):
            return 1

    with pytest.raises(ValueError, match="concurrency_groups"):
        Grouped.options(concurrency_groups={"io": 2})


# -- awaiting results -------------------------------------------------------------------------
@redray.remote
def blob(size: int) -> bytes:
    return b"x" * size


@redray.remote
class BlobMaker:
    def make(self, size: int) -> bytes:
        return b"y" * size


BIG = 200 * 1024  # above the inline limit: the result lives in the object store


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cluster", ["ray_start_1cpu", "ray_start"])
@pytest.mark.parametrize("size", [10 * 1024, BIG])
def test_await_a_task_result_in_asyncio(cluster, size, request):
    request.getfixturevalue(cluster)

    async def main():
        return await asyncio.wait_for(_awaited(blob.remote(size)), 20)

    assert asyncio.run(main()) == b"x" * size
    # The driver still works afterwards.
    assert redray.get(blob.remote(10), timeout=20) == b"x" * 10


async def _awaited(ref):
    return await ref


@pytest.mark.timeout(60)
def test_await_many_large_results_and_an_actor_future(ray_start):
    maker = BlobMaker.remote()

    async def main():
        results = asyncio.gather(*(_awaited(blob.remote(BIG + i)) for i in range(8)))
        from_actor = maker.make.remote(BIG).as_future()
        return await asyncio.wait_for(asyncio.gather(results, from_actor), 30)

    results, from_actor = asyncio.run(main())
    assert [len(r) for r in results] == [BIG + i for i in range(8)]
    assert from_actor == b"y" * BIG
    assert redray.get(maker.make.remote(10), timeout=20) == b"y" * 10


@pytest.mark.timeout(60)
def test_future_of_a_large_result_from_a_plain_thread(ray_start):
    """A concurrent.futures.Future of a stored object resolves (and its callbacks run)."""
    future = blob.remote(BIG).future()
    assert future.result(timeout=20) == b"x" * BIG
    ready = blob.remote(BIG)
    redray.wait([ready], timeout=20)
    assert ready.future().result(timeout=20) == b"x" * BIG


# -- resource views ---------------------------------------------------------------------------
@redray.remote
def hold_cpu(started: str, release: str) -> str:
    mark(started)
    block_until(release)
    return "done"


@redray.remote
def wait_on_inner(started: str, inner_started: str, release: str) -> str:
    mark(started)
    return redray.get(hold_cpu.remote(inner_started, release))


@pytest.mark.timeout(60)
def test_available_resources_are_current_on_this_node(ray_start, gate):
    """What this node has free is read from its raylet at the time of the call: a task
    holding a CPU shows at once, and its CPU is back as soon as its lease is returned."""
    for i in range(3):
        ref = hold_cpu.remote(gate.path(f"started{i}"), gate.path(f"release{i}"))
        gate.wait_mark(f"started{i}")
        assert redray.available_resources().get("CPU", 0.0) == 1.0
        mark(gate.path(f"release{i}"))
        assert redray.get(ref, timeout=20) == "done"
        wait_for(lambda: redray.available_resources().get("CPU") == 2.0, timeout=5)
    # A task blocked in get lends its CPU back; both CPUs are free soon after it is done.
    ref = wait_on_inner.remote(gate.path("outer"), gate.path("inner"), gate.path("release"))
    gate.wait_mark("inner")
    wait_for(lambda: redray.available_resources().get("CPU") == 1.0, timeout=5)
    gate.open()
    mark(gate.path("release"))
    assert redray.get(ref, timeout=20) == "done"
    done = time.monotonic()
    wait_for(lambda: redray.available_resources().get("CPU") == 2.0, timeout=5, interval=0.005)
    print(f"both CPUs free {time.monotonic() - done:.3f} s after the blocked task returned")


def test_cluster_resources_have_the_store_and_memory_as_ray(ray_start):
    total = redray.cluster_resources()
    available = redray.available_resources()
    node = redray.nodes()[0]
    for view in (total, available, node["Resources"]):
        assert view["object_store_memory"] == node["object_store_memory"] > 0
        assert view["memory"] > 0
    assert {"CPU", "memory", "object_store_memory", "node:__internal_head__"} <= set(total)
    assert any(name.startswith("node:") and name != "node:__internal_head__" for name in total)


class DiesWhilePickledOnce:
    """Kills its process while being pickled as a task's return, on the first attempt only:
    the task's earlier large return is already in the store by then."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        if not os.path.exists(self.marker):
            mark(self.marker)
            os.kill(os.getpid(), signal.SIGKILL)
        return (str, ("second",))


@redray.remote(num_returns=2, max_retries=1)
def large_then_dies(marker: str):
    return b"x" * (1 << 20), DiesWhilePickledOnce(marker)


def test_a_retry_after_a_death_between_two_returns_reuses_the_stored_one(ray_start, tmp_path):
    """The first attempt stored its 1 MiB return and died writing the second: the retry
    finds the first already in the store (same id, same value) and completes, as in Ray."""
    first, second = large_then_dies.remote(str(tmp_path / "died"))
    assert redray.get(second, timeout=60) == "second"
    assert redray.get(first, timeout=60) == b"x" * (1 << 20)
