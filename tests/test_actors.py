"""Actors on a real cluster: handles, ordering, named and detached actors, lifetimes, kill,
restarts after SIGKILL, async/threaded concurrency, concurrency groups and resources.

One 2-CPU cluster (the `cluster` fixture) serves the module; tests that need a driver of
their own run it in a subprocess. Actor processes really get SIGKILLed (by the pid they
report) and the tests check what survives. The detached-actor and placement tests use a
cluster started with `python -m redray.cli start --head` (in its own TMPDIR) plus a second
node, which outlives the drivers using it.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import REPO, block_until, count_lines, last_json, mark, run_driver, wait_for

import redray
import redray.actor
import redray.util
from redray.exceptions import (
    ActorDiedError,
    RayActorError,
    RayError,
    RayTaskError,
    TaskCancelledError,
    WorkerCrashedError,
)
from redray.node.redis_server import free_port


# -- actors and tasks used below -------------------------------------------------------------
@redray.remote
class Counter:
    def __init__(self, start: int = 0, step: int = 1):
        self.value = start
        self.step = step

    def incr(self, by: int | None = None) -> int:
        self.value += self.step if by is None else by
        return self.value

    def get(self) -> int:
        return self.value

    def pid(self) -> int:
        return os.getpid()

    @redray.method(num_returns=2)
    def pair(self) -> tuple[int, int]:
        return self.value, -self.value

    def triple(self) -> tuple[int, int, int]:
        return self.value, self.value + 1, self.value + 2

    def reconstructed(self) -> bool:
        return redray.get_runtime_context().was_current_actor_reconstructed

    def actor_id(self) -> str | None:
        return redray.get_runtime_context().get_actor_id()

    def env(self, name: str) -> str | None:
        return os.environ.get(name)

    def node_id(self) -> str:
        return redray.get_runtime_context().get_node_id()

    def quit(self, after_file: str | None = None) -> str:
        redray.actor.exit_actor()
        if after_file:  # Ray: exit_actor() does not return, so this never runs
            mark(after_file)
        return "exiting"


@redray.remote
class Log:
    """Appends whatever it is sent; `read` returns everything in arrival order."""

    def __init__(self):
        self.items: list = []

    def append(self, item: Any) -> int:
        self.items.append(item)
        return len(self.items)

    def read(self) -> list:
        return self.items


@redray.remote
class Forwarder:
    """Holds another actor's handle (passed to its constructor) and calls through it."""

    def __init__(self, target):
        self.target = target

    def forward(self, n: int) -> int:
        refs = [self.target.incr.remote() for _ in range(n)]
        return redray.get(refs)[-1]

    def call_other(self, other, n: int) -> int:
        return redray.get([other.incr.remote() for _ in range(n)])[-1]

    def target_handle(self) -> list:
        return [self.target]


@redray.remote
class Slow:
    """A plain actor whose `block` call runs until a gate opens (first attempt only)."""

    def __init__(self):
        self.calls = 0

    def block(self, attempts_file: str, pid_file: str, release_file: str) -> tuple[int, int]:
        with open(attempts_file, "a") as f:
            f.write(f"{os.getpid()}\n")
        attempt = count_lines(attempts_file)
        if attempt == 1:
            mark(pid_file, str(os.getpid()))
            block_until(release_file)
        return attempt, os.getpid()

    def incr(self) -> int:
        self.calls += 1
        return self.calls

    def pid(self) -> int:
        return os.getpid()


@redray.remote
class Broken:
    def __init__(self, setting: int):
        raise ValueError(f"bad config {setting}")

    def ping(self) -> str:
        return "pong"


@redray.remote
class AsyncSleeper:
    def __init__(self):
        self.started = 0

    async def nap(self, seconds: float) -> int:
        self.started += 1
        await asyncio.sleep(seconds)
        return os.getpid()

    async def forever(self) -> str:
        self.started += 1
        await asyncio.sleep(60)
        return "not cancelled"

    async def count_started(self) -> int:
        return self.started


@redray.remote
class Overlap:
    """A threaded actor measuring how many calls are inside `work` at once."""

    def __init__(self, total: int, expect: int):
        self.lock = threading.Condition()
        self.inside = 0
        self.entered = 0
        self.max_inside = 0
        self.total = total
        self.expect = expect

    def work(self) -> int:
        with self.lock:
            self.inside += 1
            self.entered += 1
            self.max_inside = max(self.max_inside, self.inside)
            self.lock.notify_all()
            # Stay until `expect` calls are inside together, or no more calls will come.
            self.lock.wait_for(
                lambda: self.inside >= self.expect or self.entered == self.total, timeout=10
            )
        time.sleep(0.01)  # the workload: give a third call the chance to slip in if it could
        with self.lock:
            self.inside -= 1
            self.lock.notify_all()
        return threading.get_ident()

    def peak(self) -> int:
        return self.max_inside


@redray.remote
class Meeting:
    """Calls that all wait for each other at a barrier: succeeds only if they overlap."""

    def __init__(self, parties: int):
        self.barrier = threading.Barrier(parties, timeout=10)

    def meet(self) -> int:
        return self.barrier.wait()


@redray.remote(concurrency_groups={"io": 2, "compute": 1})
class Grouped:
    def __init__(self):
        self.io_barrier = threading.Barrier(2, timeout=10)

    @redray.method(concurrency_group="compute")
    def compute(self, started_file: str, release_file: str) -> str:
        mark(started_file, str(threading.get_ident()))
        block_until(release_file)
        return "computed"

    @redray.method(concurrency_group="io")
    def io(self, x: int) -> int:
        return x * 2

    @redray.method(concurrency_group="io")
    def io_meet(self) -> int:
        return self.io_barrier.wait()


@redray.remote
class Gated:
    """Its constructor waits for the gate `release<N>` on its N-th run (N = attempt)."""

    def __init__(self, gate_dir: str):
        attempts = os.path.join(gate_dir, "ctor-attempts")
        with open(attempts, "a") as f:
            f.write(f"{os.getpid()}\n")
        attempt = count_lines(attempts)
        mark(os.path.join(gate_dir, f"ctor-started{attempt}"), str(os.getpid()))
        block_until(os.path.join(gate_dir, f"release{attempt}"))
        self.items: list = []

    def append(self, x: Any) -> list:
        self.items.append(x)
        return list(self.items)

    def pid(self) -> int:
        return os.getpid()


@redray.remote
class Faulty:
    def __init__(self):
        self.calls = 0

    def fail(self, text: str) -> None:
        self.calls += 1
        raise KeyError(text)

    def count(self) -> int:
        self.calls += 1
        return self.calls

    def pid(self) -> int:
        return os.getpid()


@redray.remote
class Parent:
    """Creates (and owns) a child actor."""

    def __init__(self):
        self.child = Counter.remote()

    def child_pid(self) -> int:
        return redray.get(self.child.pid.remote())

    def pid(self) -> int:
        return os.getpid()


@redray.remote
class NamespaceProbe:
    def namespace(self) -> str:
        return redray.get_runtime_context().namespace

    def lookup(self, name: str) -> int:
        return redray.get(redray.get_actor(name).get.remote())


@redray.remote
class Napper:
    """Slow calls on a plain, threaded or async actor (chosen by options/which method)."""

    def nap(self, seconds: float) -> str:
        time.sleep(seconds)  # the workload
        return "napped"

    def pid(self) -> int:
        return os.getpid()


@redray.remote
class AsyncNapper:
    async def nap(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "napped"

    def pid(self) -> int:
        return os.getpid()


@redray.remote
class Blockable:
    """Plain or async (`ablock`/`arecord`) methods that block on a gate, and a record of runs."""

    def __init__(self):
        self.ran: list = []

    def block(self, started_file: str, release_file: str) -> str:
        mark(started_file)
        block_until(release_file)
        return "unblocked"

    def record(self, x: Any) -> Any:
        self.ran.append(x)
        return x

    def runs(self) -> list:
        return self.ran


@redray.remote
class AsyncBlockable:
    def __init__(self):
        self.ran: list = []

    async def block(self, started_file: str, release_file: str) -> str:
        mark(started_file)
        while not os.path.exists(release_file):
            await asyncio.sleep(0.005)
        return "unblocked"

    async def record(self, x: Any) -> Any:
        self.ran.append(x)
        return x

    async def runs(self) -> list:
        return self.ran


@redray.remote(concurrency_groups={"a": 1, "b": 1})
class TwoGroups:
    @redray.method(concurrency_group="a")
    def wait_gate(self, started_file: str, release_file: str) -> str:
        mark(started_file)
        block_until(release_file)
        return threading.current_thread().name


@redray.remote(concurrency_groups={"io": 2})
class AsyncGrouped:
    def __init__(self):
        self.inside = 0
        self.peak = 0

    @redray.method(concurrency_group="io")
    async def io(self) -> None:
        self.inside += 1
        self.peak = max(self.peak, self.inside)
        await asyncio.sleep(0.05)
        self.inside -= 1

    async def unlimited(self) -> None:
        self.inside += 1
        self.peak = max(self.peak, self.inside)
        await asyncio.sleep(0.05)
        self.inside -= 1

    async def max_inside(self) -> int:
        peak, self.peak = self.peak, 0
        return peak


@redray.remote
class Forker:
    """An actor that forks a helper process (as multiprocessing or a DataLoader with the fork
    start method do): the helper inherits the actor's sockets."""

    def pid(self) -> int:
        return os.getpid()

    def fork_helper(self, release_file: str, keep_only_caller: bool = False) -> int:
        """Fork a helper that lives until release_file exists. With keep_only_caller, the
        helper closes every inherited socket but the one this call came in on."""
        from redray.core import context

        connections = psutil.Process().net_connections("all")
        keep = [context.current.executor.context().conn.fileno]
        child = os.fork()
        if child == 0:
            try:
                if keep_only_caller:
                    for c in connections:
                        if c.fd >= 0 and c.fd not in keep:
                            try:
                                os.close(c.fd)
                            except OSError:
                                pass
                block_until(release_file, timeout=60)
            finally:
                os._exit(0)
        return child

    def nap(self, seconds: float) -> str:
        time.sleep(seconds)  # the workload
        return "napped"

    def nap_once(self, attempts_file: str, release_file: str) -> int:
        """Blocks on its first attempt only; returns the attempt number."""
        with open(attempts_file, "a") as f:
            f.write(f"{os.getpid()}\n")
        attempt = count_lines(attempts_file)
        if attempt == 1:
            block_until(release_file)
        return attempt


@redray.remote
class Echo:
    """Returns what it is sent; plain, or threaded with max_concurrency (see AsyncEcho)."""

    def echo(self, x: Any) -> Any:
        return x

    def pid(self) -> int:
        return os.getpid()


@redray.remote
class AsyncEcho:
    async def echo(self, x: Any) -> Any:
        await asyncio.sleep(0)
        return x

    def pid(self) -> int:
        return os.getpid()


@redray.remote
class Finisher:
    """A call that blocks on a gate and marks that it finished."""

    def block_then_mark(self, started_file: str, release_file: str, finished_file: str) -> str:
        mark(started_file)
        block_until(release_file)
        mark(finished_file)
        return "finished"

    def pid(self) -> int:
        return os.getpid()


@redray.remote(max_retries=0)
def call_and_hang(handle, started: str, release: str, finished: str, pid_file: str) -> None:
    """Calls the actor without waiting for the result, then hangs (until SIGKILLed)."""
    handle.block_then_mark.remote(started, release, finished)
    mark(pid_file, str(os.getpid()))
    block_until(pid_file + ".never", timeout=60)


GROUP_LIMITS = {"g1": 1, "g2": 1}


@redray.remote(concurrency_groups=GROUP_LIMITS)
class ThreadedGroups:
    """Synchronous methods that block on a gate in g1 or in the default group."""

    @redray.method(concurrency_group="g1")
    def block_in_g1(self, started_file: str, release_file: str) -> str:
        mark(started_file)
        block_until(release_file)
        return threading.current_thread().name

    def block_in_default(self, started_file: str, release_file: str) -> str:
        mark(started_file)
        block_until(release_file)
        return threading.current_thread().name

    @redray.method(concurrency_group="g2")
    def in_g2(self) -> str:
        return threading.current_thread().name


@redray.remote(concurrency_groups=GROUP_LIMITS)
class AsyncGroups:
    """An async actor whose synchronous methods block on a gate in g1 or the default group
    (each runs on its group's event-loop thread, blocking that loop)."""

    @redray.method(concurrency_group="g1")
    def block_in_g1(self, started_file: str, release_file: str) -> str:
        mark(started_file)
        block_until(release_file)
        return threading.current_thread().name

    def block_in_default(self, started_file: str, release_file: str) -> str:
        mark(started_file)
        block_until(release_file)
        return threading.current_thread().name

    @redray.method(concurrency_group="g2")
    async def in_g2(self) -> str:
        return threading.current_thread().name

    async def in_default(self) -> str:
        return threading.current_thread().name


@redray.remote
def echo_task(x: Any) -> Any:
    return x


@redray.remote
def value_after_gate(release_file: str, value: Any) -> Any:
    block_until(release_file)
    return value


@redray.remote
def failing_task() -> None:
    raise KeyError("dependency failed")


@redray.remote
def namespace_and_lookup(name: str) -> list:
    found = redray.get(redray.get_actor(name).get.remote())
    return [redray.get_runtime_context().namespace, found]


@redray.remote
def call_through(handle, caller: int, n: int) -> int:
    """A task submitting n ordered calls to an actor through a handle it was given."""
    refs = [handle.append.remote((caller, i)) for i in range(n)]
    return redray.get(refs[-1])


@redray.remote
def count_handles(handles: list) -> int:
    return len(handles)


@redray.remote
def incr_all(handles: list, n: int) -> list:
    """A task calling every actor in a list of handles n times; returns the final values."""
    return [redray.get([h.incr.remote() for _ in range(n)])[-1] for h in handles]


# -- helpers ---------------------------------------------------------------------------------
def actor_record(actor_hex: str) -> dict:
    """The actor's entry in the cluster's actor table (what the state API shows)."""
    return redray.core.context.current.gcs.actor(actor_hex) or {}


OUT_OF_SCOPE = "The actor is dead because all references to the actor were removed."


def wait_out_of_scope_death(actor_hex: str, pid: int) -> None:
    """The actor's process exits and its death is recorded with Ray's out-of-scope cause."""
    wait_gone(pid, what="out-of-scope actor")
    wait_for(
        lambda: actor_record(actor_hex).get("state") == "DEAD",
        message="the actor's death was never recorded",
    )
    assert actor_record(actor_hex)["death_cause"] == OUT_OF_SCOPE


def gone(pid: int) -> bool:
    """The process is gone (or a zombie nobody reaped yet)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, timeout: float = 10.0, what: str = "actor") -> None:
    wait_for(lambda: gone(pid), timeout, 0.02, f"{what} process {pid} still runs after {timeout} s")


def wait_gone_collecting(pid: int, timeout: float = 10.0, what: str = "actor") -> None:
    """wait_gone, collecting garbage meanwhile: releasing one handle can release others
    (a handle kept for an actor's creation arguments) that only a GC pass frees (see
    HANDLE_CYCLE)."""

    def collected_and_gone() -> bool:
        gc.collect()
        return gone(pid)

    wait_for(
        collected_and_gone, timeout, 0.02, f"{what} process {pid} still runs after {timeout} s"
    )


def sigkill(pid: int) -> None:
    assert pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid, what="SIGKILLed actor")


def wait_new_pid(handle: Any, old_pid: int, timeout: float = 20.0) -> int:
    """Call `pid` until the restarted actor answers from a new process (calls sent to the dead
    one before this caller learnt of the death may fail; that is Ray's contract too)."""
    found: list[int] = []

    def answered() -> bool:
        try:
            pid = redray.get(handle.pid.remote(), timeout=timeout)
        except RayActorError:
            return False
        if pid != old_pid:
            found.append(pid)
        return bool(found)

    wait_for(answered, timeout, 0.05, "the actor never came back in a new process")
    return found[0]


# What the error of a call to an actor whose process died (and will not restart) says.
DEATH_BY_SIGNAL = "worker process"


def available_cpus() -> float:
    return redray.available_resources().get("CPU", 0.0)


def wait_available_cpus(expected: float, timeout: float = 15.0) -> None:
    """Heartbeats carry the available resources (every ~0.5 s): poll until they say so."""
    deadline = time.monotonic() + timeout
    while (seen := available_cpus()) != expected:
        assert time.monotonic() < deadline, f"available CPU is {seen}, never became {expected}"
        time.sleep(0.05)


def cluster_address(ctx: Any) -> str:
    return ctx["address"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """The module's cluster: 2 CPUs, shared by every test here (stopped at the module's end).

    Before any test creates an actor it waits until the control loop has taken charge:
    an actor that can never be placed is created and killed, and its death is only ever
    recorded by a control loop that has adopted the actor table. (An actor created while the
    control loop is still taking charge can be scheduled twice, which leaks a worker lease and
    its CPU: see the report on `ControlLoop._request_create_actor`.)
    """
    if redray.is_initialized():
        redray.shutdown()
    ctx = redray.init(num_cpus=2)
    try:
        probe = Counter.options(resources={"never-available": 1}).remote()
        ref = probe.get.remote()
        redray.kill(probe)
        with pytest.raises(ActorDiedError):
            redray.get(ref, timeout=30)
        yield ctx
    finally:
        redray.shutdown()


# -- 1. creating actors and calling them -------------------------------------------------------
def test_create_and_call_with_args_and_kwargs(cluster):
    counter = Counter.remote(10, step=5)
    assert redray.get(counter.incr.remote()) == 15
    assert redray.get(counter.incr.remote(by=100)) == 115
    assert redray.get(counter.get.remote()) == 115
    assert redray.get(counter.actor_id.remote()) == counter._actor_id_hex


def test_direct_calls_and_instantiation_raise_type_error(cluster):
    with pytest.raises(TypeError, match=r"Counter\.remote\(\)"):
        Counter()
    with pytest.raises(TypeError, match=r"Counter\.remote\(\)"):
        Counter(1, step=2)
    counter = Counter.remote()
    with pytest.raises(TypeError, match=r"incr\.remote\(\)"):
        counter.incr()
    # Nothing ran: the actor's state is untouched.
    assert redray.get(counter.get.remote()) == 0


def test_unknown_method_is_attribute_error(cluster):
    counter = Counter.remote()
    with pytest.raises(AttributeError, match="no_such_method"):
        counter.no_such_method.remote()
    with pytest.raises(AttributeError):
        counter._private_thing  # noqa: B018
    assert not hasattr(counter, "no_such_method")
    assert redray.get(counter.incr.remote()) == 1


def test_method_num_returns(cluster):
    counter = Counter.remote(7)
    first, second = counter.pair.remote()
    assert redray.get([first, second]) == [7, -7]
    refs = counter.triple.options(num_returns=3).remote()
    assert len(refs) == 3 and redray.get(refs) == [7, 8, 9]
    # Without options the method's own default (one return) still applies.
    assert redray.get(counter.triple.remote()) == (7, 8, 9)


def test_options_on_class_and_method(cluster):
    env = {"env_vars": {"REDRAY_ACTOR_TEST_VAR": "from-options"}}
    counter = Counter.options(runtime_env=env, max_concurrency=1).remote(3)
    assert redray.get(counter.env.remote("REDRAY_ACTOR_TEST_VAR")) == "from-options"
    assert redray.get(counter.get.remote()) == 3
    # `.options` does not change the class's defaults.
    plain = Counter.remote()
    assert redray.get(plain.env.remote("REDRAY_ACTOR_TEST_VAR")) is None
    # Method options: num_returns overridden per call, and the annotated default kept.
    a, b = counter.pair.options(num_returns=2).remote()
    assert redray.get([a, b]) == [3, -3]
    whole = counter.pair.options(num_returns=1).remote()
    assert redray.get(whole) == (3, -3)


def test_bad_actor_options_fail_where_written(cluster):
    with pytest.raises((ValueError, TypeError)):
        Counter.options(no_such_option=1)
    with pytest.raises((ValueError, TypeError)):
        Counter.options(max_restarts="many")
    with pytest.raises(ValueError):
        redray.method(2)


def test_handles_pass_into_tasks_and_other_actors(cluster):
    counter = Counter.remote()
    other = Counter.remote(1000)
    # Into a task, nested in a list.
    assert redray.get(incr_all.remote([counter, other], 5)) == [5, 1005]
    # Into an actor's constructor, and as a method argument.
    forwarder = Forwarder.remote(counter)
    assert redray.get(forwarder.forward.remote(3)) == 8
    assert redray.get(forwarder.call_other.remote(other, 2)) == 1007
    # Back out of an actor: the handle it returns still reaches the same actor.
    [returned] = redray.get(forwarder.target_handle.remote())
    assert returned == counter
    assert redray.get(returned.incr.remote()) == 9
    assert redray.get(counter.get.remote()) == 9
    assert redray.get(other.get.remote()) == 1007


def test_constructor_takes_object_refs_and_refs_to_task_results(cluster):
    counter = Counter.remote(redray.put(40), step=echo_task.remote(2))
    assert redray.get(counter.incr.remote()) == 42


def test_application_error_in_a_method(cluster):
    """A method's exception is the caller's error (RayTaskError and the user's type); the actor
    lives on with its state, and it is not restarted for it."""
    actor = Faulty.options(max_restarts=1).remote()
    pid = redray.get(actor.pid.remote())
    with pytest.raises(KeyError) as info:
        redray.get(actor.fail.remote("what went wrong"))
    assert isinstance(info.value, RayTaskError)
    assert "what went wrong" in str(info.value) and "fail" in str(info.value)
    assert redray.get(actor.count.remote()) == 2
    assert redray.get(actor.pid.remote()) == pid


def test_calls_wait_while_the_actor_is_created_and_restarted(cluster, gate):
    """Calls made before the actor is alive, or while it restarts, wait and run in order."""
    actor = Gated.options(max_restarts=1).remote(str(gate.dir))
    gate.wait_mark("ctor-started1")
    early = [actor.append.remote(i) for i in range(5)]
    Path(gate.path("release1")).touch()
    assert redray.get(early, timeout=20)[-1] == [0, 1, 2, 3, 4]
    pid = redray.get(actor.pid.remote())
    sigkill(pid)
    assert int(gate.wait_mark("ctor-started2")) != pid  # the restart is under way ...
    during = [actor.append.remote(i) for i in range(5)]  # ... and these calls wait for it
    Path(gate.path("release2")).touch()
    assert redray.get(during, timeout=20)[-1] == [0, 1, 2, 3, 4]


# -- 2. ordering -----------------------------------------------------------------------------
def test_calls_from_one_caller_run_in_submission_order(cluster):
    log = Log.remote()
    refs = [log.append.remote(i) for i in range(1000)]
    assert redray.get(refs[-1]) == 1000
    assert redray.get(log.read.remote()) == list(range(1000))
    assert redray.get(refs) == list(range(1, 1001))


def test_order_per_caller_under_many_concurrent_callers(cluster):
    log = Log.remote()
    per_caller = 250
    task_callers = [call_through.remote(log, caller, per_caller) for caller in range(4)]
    errors: list[BaseException] = []

    def thread_caller(caller: int) -> None:
        try:
            refs = [log.append.remote((caller, i)) for i in range(per_caller)]
            redray.get(refs, timeout=60)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=thread_caller, args=(c,)) for c in range(100, 104)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    redray.get(task_callers, timeout=60)
    items = redray.get(log.read.remote())
    assert len(items) == 8 * per_caller
    by_caller: dict[int, list[int]] = {}
    for caller, i in items:
        by_caller.setdefault(caller, []).append(i)
    assert sorted(by_caller) == [0, 1, 2, 3, 100, 101, 102, 103]
    for caller, sequence in by_caller.items():
        assert sequence == list(range(per_caller)), f"caller {caller} out of order"


def test_order_holds_when_an_earlier_call_waits_for_its_argument(cluster, gate):
    log = Log.remote()
    first = log.append.remote(value_after_gate.remote(gate.release_file, "slow argument"))
    second = log.append.remote("ready argument")
    failed = log.append.remote(failing_task.remote())
    third = log.append.remote("last")
    gate.open()
    assert redray.get([first, second, third], timeout=20) == [1, 2, 3]
    with pytest.raises(KeyError):  # a failed argument fails the call; it never runs
        redray.get(failed, timeout=20)
    assert redray.get(log.read.remote()) == ["slow argument", "ready argument", "last"]


# -- 3. named actors -------------------------------------------------------------------------
def test_named_actor_unique_per_namespace(cluster):
    first = Counter.options(name="unique-name").remote(1)
    assert redray.get(first.get.remote()) == 1
    with pytest.raises(ValueError, match="unique-name"):
        Counter.options(name="unique-name").remote(2)
    elsewhere = Counter.options(name="unique-name", namespace="other-ns").remote(3)
    assert redray.get(elsewhere.get.remote()) == 3
    # get_actor: this job's namespace by default, or the one named.
    assert redray.get(redray.get_actor("unique-name").get.remote()) == 1
    assert redray.get(redray.get_actor("unique-name", namespace="other-ns").get.remote()) == 3
    with pytest.raises(ValueError):
        redray.get_actor("no-such-actor")
    with pytest.raises(ValueError):
        redray.get_actor("unique-name", namespace="no-such-ns")
    # The first is still the one its name leads to.
    assert redray.get_actor("unique-name") == first
    redray.kill(first)
    redray.kill(elsewhere)


def test_get_if_exists_returns_the_existing_actor(cluster):
    made = Counter.options(name="maybe", get_if_exists=True).remote(100)
    assert redray.get(made.incr.remote()) == 101
    again = Counter.options(name="maybe", get_if_exists=True).remote(0)
    assert again == made
    assert redray.get(again.incr.remote()) == 102
    assert redray.get(made.get.remote()) == 102
    redray.kill(made)


def test_list_named_actors(cluster):
    here = Counter.options(name="listed-here").remote()
    there = Counter.options(name="listed-there", namespace="listing-ns").remote()
    redray.get([here.get.remote(), there.get.remote()])
    names = redray.util.list_named_actors()
    assert "listed-here" in names and "listed-there" not in names
    assert all(isinstance(n, str) for n in names)
    everywhere = redray.util.list_named_actors(all_namespaces=True)
    assert all(isinstance(e, dict) and set(e) >= {"name", "namespace"} for e in everywhere)
    assert {"name": "listed-there", "namespace": "listing-ns"} in everywhere
    namespace = redray.get_runtime_context().namespace
    assert {"name": "listed-here", "namespace": namespace} in everywhere
    redray.kill(there)
    wait_for(
        lambda: (
            {"name": "listed-there", "namespace": "listing-ns"}
            not in redray.util.list_named_actors(all_namespaces=True)
        ),
        message="a killed actor is still listed",
    )
    redray.kill(here)


def test_killed_named_actors_name_is_free_again(cluster):
    old = Counter.options(name="reusable").remote(5)
    old_pid = redray.get(old.pid.remote())
    redray.kill(old)
    wait_gone(old_pid)

    def lookup_fails() -> bool:
        try:
            redray.get_actor("reusable")
        except ValueError:
            return True
        return False

    wait_for(lookup_fails, message="get_actor still finds a killed actor")
    new = Counter.options(name="reusable").remote(50)
    assert redray.get(new.get.remote()) == 50
    assert redray.get_actor("reusable") == new
    redray.kill(new)


def test_tasks_and_actors_run_in_their_jobs_namespace(cluster):
    target = Counter.options(name="found-from-workers").remote(11)
    namespace = redray.get_runtime_context().namespace
    assert redray.get(namespace_and_lookup.remote("found-from-workers"), timeout=20) == [
        namespace,
        11,
    ]
    probe = NamespaceProbe.remote()
    assert redray.get(probe.namespace.remote(), timeout=20) == namespace
    assert redray.get(probe.lookup.remote("found-from-workers"), timeout=20) == 11
    redray.kill(target)


# -- 4. lifetimes ----------------------------------------------------------------------------
OWNER_DRIVER = """
    import json, os, signal, sys
    import redray

    redray.init(address={address!r})

    @redray.remote
    class Owned:
        def pid(self):
            return os.getpid()

    actors = [Owned.remote() for _ in range(2)]
    print(json.dumps(redray.get([a.pid.remote() for a in actors])), flush=True)
    if {hard!r}:
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("hard", [False, True], ids=["exit", "sigkill"])
def test_driver_exit_kills_its_actors(cluster, hard):
    """A driver's non-detached actors die with it: normal exit or SIGKILL of the driver."""
    proc = run_driver(
        OWNER_DRIVER.format(address=cluster_address(cluster), hard=hard), timeout=60, check=False
    )
    assert proc.returncode == (-signal.SIGKILL if hard else 0), proc.stderr
    pids = last_json(proc.stdout)
    assert len(pids) == 2
    for pid in pids:
        wait_gone(pid, timeout=10, what="orphaned actor")


def test_actor_is_killed_when_its_last_handle_goes(cluster):
    counter = Counter.remote()
    pid = redray.get(counter.pid.remote())
    copy = counter
    del counter
    gc.collect()
    assert redray.get(copy.incr.remote()) == 1  # one handle left: still alive
    del copy
    gc.collect()
    wait_gone(pid, timeout=10, what="out-of-scope actor")


HANDLE_CYCLE = (
    "BUG: ActorHandle.__getattr__ caches the ActorMethod in the handle's __dict__ "
    "(redray/actor.py), a handle<->method reference cycle: a used handle is only released "
    "by the cyclic GC"
)


def test_handle_borrowed_by_a_task_without_calls_is_released(cluster):
    counter = Counter.remote()
    pid = redray.get(counter.pid.remote())
    assert redray.get(count_handles.remote([counter])) == 1
    del counter
    gc.collect()
    wait_gone(pid, timeout=10, what="out-of-scope actor")


def test_handle_used_by_a_task_keeps_nothing_alive_after(cluster):
    """A handle a finished task borrowed (and called through) does not keep the actor alive."""
    counter = Counter.remote()
    pid = redray.get(counter.pid.remote())
    assert redray.get(incr_all.remote([counter], 2)) == [2]
    del counter
    gc.collect()
    wait_gone(pid, timeout=3, what="out-of-scope actor")


def test_del_of_a_used_handle_kills_without_a_gc_pass(cluster):
    """Out of scope means refcount zero (as in CPython and Ray), not "after the next GC"."""
    counter = Counter.remote()
    pid = redray.get(counter.pid.remote())
    gc.disable()
    try:
        del counter
        wait_gone(pid, timeout=3, what="out-of-scope actor")
    finally:
        gc.enable()


def test_handle_held_by_another_actor_keeps_the_actor_alive(cluster):
    counter = Counter.remote(100)
    pid = redray.get(counter.pid.remote())
    forwarder = Forwarder.remote(counter)
    assert redray.get(forwarder.forward.remote(1)) == 101
    del counter
    gc.collect()
    # The driver's handle is gone but the forwarder still holds one: alive, state intact.
    assert redray.get(forwarder.forward.remote(1), timeout=20) == 102
    assert not gone(pid)
    del forwarder
    wait_gone_collecting(pid, what="actor whose last holder went away")


# Ray: when all handles are gone the actor ends *after* the calls already submitted to it.
def test_a_call_on_a_handle_dropped_at_once_runs(cluster, gate):
    for start in range(3):
        assert redray.get(Counter.remote(start).incr.remote(), timeout=20) == start + 1
    # Still pending while the actor is created, long after its handle is gone: not failed.
    ref = Gated.remote(str(gate.dir)).append.remote("first call")
    gate.wait_mark("ctor-started1")
    gc.collect()
    assert redray.wait([ref], timeout=1) == ([], [ref])
    Path(gate.path("release1")).touch()
    assert redray.get(ref, timeout=20) == ["first call"]


def make_echo(kind: str) -> Any:
    if kind == "async":
        return AsyncEcho.remote()
    return Echo.options(max_concurrency=4 if kind == "threaded" else 1).remote()


@pytest.mark.parametrize("kind", ["plain", "threaded", "async"])
def test_calls_made_before_the_last_handle_goes_all_run_then_the_actor_ends(cluster, kind):
    actor = make_echo(kind)
    actor_hex = actor._actor_id_hex
    refs = [actor.echo.remote(i) for i in range(100)]
    pid_ref = actor.pid.remote()
    late = [actor.echo.remote(i) for i in range(100, 120)]
    del actor
    gc.collect()
    assert redray.get(refs + late, timeout=30) == list(range(120))
    wait_out_of_scope_death(actor_hex, redray.get(pid_ref, timeout=20))


def test_calls_made_while_the_actor_is_created_run_after_its_handle_is_gone(cluster, gate):
    actor = Gated.remote(str(gate.dir))
    actor_hex = actor._actor_id_hex
    pid = int(gate.wait_mark("ctor-started1"))
    refs = [actor.append.remote(i) for i in range(5)]
    del actor
    gc.collect()
    assert redray.wait(refs, num_returns=5, timeout=1) == ([], refs)  # waiting, not failed
    Path(gate.path("release1")).touch()
    assert redray.get(refs, timeout=20)[-1] == [0, 1, 2, 3, 4]
    wait_out_of_scope_death(actor_hex, pid)


def test_an_actor_dropped_while_its_constructor_runs_ends(cluster, gate):
    """No calls, no handle: the half-made actor goes (its constructor does not finish)."""
    actor = Gated.remote(str(gate.dir))
    actor_hex = actor._actor_id_hex
    pid = int(gate.wait_mark("ctor-started1"))
    del actor
    gc.collect()
    wait_out_of_scope_death(actor_hex, pid)
    assert actor_record(actor_hex)["state"] == "DEAD"  # for good: not alive after all


def test_an_actor_out_of_scope_finishes_the_calls_it_accepted_before_it_exits(cluster, gate):
    """Ray ends an actor out of scope gracefully: it refuses new calls, finishes those it
    accepted (here one from a task that died since), then exits."""
    name = "finishes-before-exit"
    actor = Finisher.options(name=name, max_concurrency=2).remote()  # probes run meanwhile
    pid = redray.get(actor.pid.remote())
    task = call_and_hang.remote(
        actor,
        gate.path("started"),
        gate.release_file,
        gate.path("finished"),
        gate.path("task-pid"),
    )
    gate.wait_mark("started")
    sigkill(int(gate.wait_mark("task-pid")))
    with pytest.raises(WorkerCrashedError):
        redray.get(task, timeout=20)
    actor_hex = actor._actor_id_hex
    del task, actor
    gc.collect()

    def refused() -> str | None:
        handle = redray.get_actor(name)  # alive until it has finished
        try:
            redray.get(handle.pid.remote(), timeout=10)
        except ActorDiedError as exc:
            return str(exc)
        return None

    assert OUT_OF_SCOPE in wait_for(refused, message="the actor was never ended")
    assert not gone(pid)
    assert not os.path.exists(gate.path("finished"))
    gate.open()
    gate.wait_mark("finished")
    wait_out_of_scope_death(actor_hex, pid)


@pytest.mark.parametrize("how", ["kill", "sigkill"])
def test_actor_created_by_an_actor_dies_with_it(cluster, how):
    parent = Parent.remote()
    child_pid = redray.get(parent.child_pid.remote())
    if how == "kill":
        redray.kill(parent)
    else:
        sigkill(redray.get(parent.pid.remote()))
    wait_gone(child_pid, timeout=10, what="child actor of a dead actor")


# -- a cluster that outlives its drivers (redray start) --------------------------------------
def redray_cli(*args: str, tmpdir: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, TMPDIR=str(tmpdir))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    for var in ("REDRAY_ADDRESS", "RAY_ADDRESS"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, "-m", "redray.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"redray {' '.join(args)} exited with {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture(scope="module")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`redray start --head` (2 CPUs) plus a second node with the custom resource "special"."""
    if not (REPO / "redray" / "cli.py").exists():
        pytest.skip("redray/cli.py (redray start/stop) does not exist yet")
    tmpdir = tmp_path_factory.mktemp("standalone")
    cluster = f"actors{os.getpid()}"
    store = str(100 * 1024 * 1024)
    try:
        redray_cli(
            "start",
            "--head",
            "--port",
            str(free_port()),
            "--num-cpus",
            "2",
            "--object-store-memory",
            store,
            "--cluster",
            cluster,
            tmpdir=tmpdir,
        )
        record = json.loads((tmpdir / f"redray-{os.getuid()}" / "current_cluster.json").read_text())
        redray_cli(
            "node",
            "--redis",
            record["gcs_url"],
            "--cluster",
            cluster,
            "--num-cpus",
            "1",
            "--object-store-memory",
            store,
            "--resources",
            '{"special": 2}',
            tmpdir=tmpdir,
        )
        record = json.loads((tmpdir / f"redray-{os.getuid()}" / "current_cluster.json").read_text())
        yield {"tmpdir": tmpdir, "record": record}
    finally:
        redray_cli("stop", tmpdir=tmpdir, check=False)


def standalone_driver(script: str, standalone: dict[str, Any]) -> Any:
    """Run a driver connected with address="auto" to the standalone cluster; its last JSON."""
    proc = run_driver(script, timeout=60, env={"TMPDIR": str(standalone["tmpdir"])})
    return last_json(proc.stdout)


def test_a_removal_asked_for_just_before_exit_still_happens(standalone):
    """remove_placement_group returns at once (as Ray's) and the request leaves from a
    background thread: a driver that exits right after must still have it carried out
    (a detached group is not removed with its owner, so nothing else would)."""
    first = standalone_driver(
        """
        import json, redray
        from redray.util import placement_group, remove_placement_group
        redray.init(address="auto")
        groups = [placement_group([{"CPU": 0.1}], lifetime="detached") for _ in range(3)]
        for pg in groups:
            assert pg.wait(timeout_seconds=30)
        for pg in groups:
            remove_placement_group(pg)
        print(json.dumps([pg.id.hex() for pg in groups]))
        """,
        standalone,
    )
    states = standalone_driver(
        f"""
        import json, time, redray
        from redray.util import placement_group_table
        redray.init(address="auto")
        ids = {first!r}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            table = placement_group_table()
            states = [table.get(i, {{}}).get("state") for i in ids]
            if states == ["REMOVED"] * len(ids):
                break
            time.sleep(0.05)
        print(json.dumps(states))
        """,
        standalone,
    )
    assert states == ["REMOVED"] * 3


def test_detached_actor_outlives_its_driver_and_serves_another(standalone):
    first = standalone_driver(
        """
        import json, os, redray
        redray.init(address="auto")

        @redray.remote
        class Keeper:
            def __init__(self):
                self.items = []
            def add(self, x):
                self.items.append(x)
                return list(self.items)
            def pid(self):
                return os.getpid()

        keeper = Keeper.options(name="keeper", namespace="shared", lifetime="detached").remote()
        owned = Keeper.remote()
        redray.get([keeper.add.remote("from driver 1"), owned.add.remote(0)])
        print(json.dumps({"detached": redray.get(keeper.pid.remote()),
                          "owned": redray.get(owned.pid.remote())}))
        """,
        standalone,
    )
    # The driver is gone: its non-detached actor went with it, the detached one did not.
    wait_gone(first["owned"], timeout=10, what="non-detached actor of an exited driver")
    assert not gone(first["detached"])
    second = standalone_driver(
        """
        import json, os, redray, redray.util
        redray.init(address="auto")
        names = redray.util.list_named_actors(all_namespaces=True)
        keeper = redray.get_actor("keeper", namespace="shared")
        items = redray.get(keeper.add.remote("from driver 2"))
        pid = redray.get(keeper.pid.remote())
        print(json.dumps({"items": items, "pid": pid, "names": names}))
        """,
        standalone,
    )
    assert second["items"] == ["from driver 1", "from driver 2"]
    assert second["pid"] == first["detached"]
    assert {"name": "keeper", "namespace": "shared"} in second["names"]
    # The second driver exiting does not end it either; a third one kills it.
    assert not gone(first["detached"])
    third = standalone_driver(
        """
        import json, redray
        redray.init(address="auto")
        redray.kill(redray.get_actor("keeper", namespace="shared"))
        print(json.dumps({"killed": True}))
        """,
        standalone,
    )
    assert third == {"killed": True}
    wait_gone(first["detached"], timeout=10, what="killed detached actor")


def test_custom_resources_and_strategies_route_placement(standalone):
    result = standalone_driver(
        """
        import json, redray
        from redray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        redray.init(address="auto")

        @redray.remote
        class Where:
            def node(self):
                return redray.get_runtime_context().get_node_id()

        nodes = {n["NodeID"]: n["Resources"] for n in redray.nodes() if n["Alive"]}
        head = [n for n, res in nodes.items() if not res.get("special")][0]
        other = [n for n, res in nodes.items() if res.get("special")][0]
        special = [Where.options(resources={"special": 1}).remote() for _ in range(2)]
        pinned = [
            Where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
            .remote()
            for n in (head, other)
        ]
        print(json.dumps({"special": redray.get([a.node.remote() for a in special]),
                          "pinned": redray.get([a.node.remote() for a in pinned]),
                          "head": head, "other": other}))
        """,
        standalone,
    )
    assert result["head"] != result["other"]
    assert result["special"] == [result["other"]] * 2
    assert result["pinned"] == [result["head"], result["other"]]


# -- 5. kill and graceful exits --------------------------------------------------------------
def known_dead(name: str) -> None:
    """Wait until the cluster has recorded the named actor's death (get_actor fails)."""

    def lookup_fails() -> bool:
        try:
            redray.get_actor(name)
        except ValueError:
            return True
        return False

    wait_for(lookup_fails, 15, 0.02, f"the cluster never recorded the death of {name!r}")


def test_kill_no_restart(cluster):
    counter = Counter.options(name="to-kill", max_restarts=1).remote()
    assert redray.get(counter.incr.remote()) == 1
    pid = redray.get(counter.pid.remote())
    redray.kill(counter)
    wait_gone(pid)
    known_dead("to-kill")
    for _ in range(3):  # no restart, whatever max_restarts says; the cause is named
        with pytest.raises(ActorDiedError, match=r"kill\(\)"):
            redray.get(counter.incr.remote(), timeout=20)


def test_kill_an_actor_that_was_never_placed(cluster):
    nowhere = Counter.options(resources={"unobtainium": 1}).remote()
    ref = nowhere.incr.remote()
    assert redray.wait([ref], timeout=0.2) == ([], [ref])
    redray.kill(nowhere)
    with pytest.raises(ActorDiedError, match=r"kill\(\)"):
        redray.get(ref, timeout=20)


def test_the_table_of_called_actors_forgets_dead_ones(cluster):
    """This process's table of the actors it calls keeps those not known to be dead only."""
    table = redray.core.context.current.actors._actors
    baseline = len(table)
    actors = [Counter.remote(i) for i in range(200)]
    assert redray.get([a.get.remote() for a in actors[:10]], timeout=60) == list(range(10))
    for actor in actors:
        redray.kill(actor)
    with pytest.raises(ActorDiedError):
        redray.get(actors[0].get.remote(), timeout=20)
    del actors, actor
    wait_for(
        lambda: len(table) <= baseline,
        timeout=60,
        message="the table still holds dead actors",
    )


def test_kill_rejects_non_actors(cluster):
    with pytest.raises(ValueError):
        redray.kill(redray.put(1))
    with pytest.raises(ValueError):
        redray.kill("not an actor")


def test_kill_with_restart_resets_state(cluster):
    counter = Counter.options(name="kill-restart", max_restarts=1).remote()
    assert redray.get([counter.incr.remote() for _ in range(3)]) == [1, 2, 3]
    pid = redray.get(counter.pid.remote())
    redray.kill(counter, no_restart=False)
    wait_gone(pid)
    new_pid = wait_new_pid(counter, pid)
    assert new_pid != pid
    assert redray.get(counter.get.remote()) == 0
    assert redray.get(counter.reconstructed.remote()) is True
    assert redray.get_actor("kill-restart") == counter  # still known by its name
    # The single restart is used up: the next death is final.
    redray.kill(counter, no_restart=False)
    wait_gone(new_pid)
    known_dead("kill-restart")
    with pytest.raises(ActorDiedError):
        redray.get(counter.incr.remote(), timeout=20)


def test_ray_terminate_lets_earlier_calls_finish(cluster):
    counter = Counter.options(name="terminated").remote()
    pid = redray.get(counter.pid.remote())
    refs = [counter.incr.remote() for _ in range(50)]
    counter.__ray_terminate__.remote()
    assert redray.get(refs, timeout=30) == list(range(1, 51))
    wait_gone(pid)
    known_dead("terminated")
    with pytest.raises(ActorDiedError, match="__ray_terminate__"):
        redray.get(counter.incr.remote(), timeout=20)


@pytest.mark.parametrize(
    "kind",
    [
        "plain",
        "threaded",
        "async",
    ],
)
def test_ray_terminate_waits_for_running_calls(cluster, kind):
    if kind == "async":
        actor = AsyncNapper.remote()
    else:
        actor = Napper.options(max_concurrency=4 if kind == "threaded" else 1).remote()
    pid = redray.get(actor.pid.remote())
    refs = [actor.nap.remote(0.3) for _ in range(3)]
    actor.__ray_terminate__.remote()
    assert redray.get(refs, timeout=20) == ["napped"] * 3
    wait_gone(pid)


def test_calls_behind_ray_terminate_fail(cluster):
    counter = Counter.remote()
    before = [counter.incr.remote() for _ in range(5)]
    counter.__ray_terminate__.remote()
    after = [counter.incr.remote() for _ in range(5)]
    assert redray.get(before, timeout=30) == [1, 2, 3, 4, 5]
    for ref in after:
        with pytest.raises(ActorDiedError):
            redray.get(ref, timeout=20)


def test_exit_actor_inside_a_method(cluster):
    counter = Counter.options(name="exits", max_restarts=2).remote()
    pid = redray.get(counter.pid.remote())
    before = [counter.incr.remote() for _ in range(5)]
    counter.quit.remote()
    assert redray.get(before, timeout=30) == [1, 2, 3, 4, 5]
    wait_gone(pid)
    known_dead("exits")
    # An exit on purpose is final even with restarts left, and the cause says why.
    with pytest.raises(ActorDiedError, match="exit_actor"):
        redray.get(counter.incr.remote(), timeout=20)


def test_exit_actor_does_not_return(cluster, tmp_path):
    counter = Counter.remote()
    after = str(tmp_path / "after-exit-actor")
    with pytest.raises(RayActorError, match="exit_actor"):
        redray.get(counter.quit.remote(after), timeout=20)
    assert not os.path.exists(after)


def test_exit_actor_outside_an_actor_is_an_error(cluster):
    with pytest.raises(TypeError):
        redray.actor.exit_actor()


# -- 6. fault tolerance ----------------------------------------------------------------------
def test_sigkill_restarts_actor_with_fresh_state(cluster):
    counter = Counter.options(max_restarts=1).remote()
    assert redray.get([counter.incr.remote() for _ in range(3)]) == [1, 2, 3]
    assert redray.get(counter.reconstructed.remote()) is False
    pid = redray.get(counter.pid.remote())
    sigkill(pid)
    new_pid = wait_new_pid(counter, pid)
    assert not gone(new_pid)
    assert redray.get(counter.get.remote()) == 0  # the constructor ran again
    assert redray.get(counter.incr.remote()) == 1
    assert redray.get(counter.reconstructed.remote()) is True


@pytest.mark.parametrize("restarts", [1, 0])
def test_sigkill_during_construction(cluster, gate, restarts):
    actor = Gated.options(max_restarts=restarts).remote(str(gate.dir))
    pid = int(gate.wait_mark("ctor-started1"))
    ref = actor.append.remote("first call")
    sigkill(pid)
    if restarts:
        assert int(gate.wait_mark("ctor-started2")) != pid
        Path(gate.path("release2")).touch()
        assert redray.get(ref, timeout=20) == ["first call"]
    else:
        with pytest.raises(ActorDiedError, match=DEATH_BY_SIGNAL):
            redray.get(ref, timeout=20)


def test_sigkill_without_restarts_is_actor_died(cluster):
    counter = Counter.options(name="sigkilled").remote()
    pid = redray.get(counter.pid.remote())
    sigkill(pid)
    known_dead("sigkilled")
    for _ in range(3):
        with pytest.raises(ActorDiedError, match=DEATH_BY_SIGNAL):
            redray.get(counter.incr.remote(), timeout=20)


def test_unlimited_restarts(cluster):
    counter = Counter.options(max_restarts=-1).remote()
    pid = redray.get(counter.pid.remote())
    for _ in range(3):
        assert redray.get(counter.incr.remote()) == 1
        sigkill(pid)
        pid = wait_new_pid(counter, pid)
    assert redray.get(counter.reconstructed.remote()) is True


def test_call_in_flight_without_task_retries_fails(cluster, gate, tmp_path):
    slow = Slow.options(max_restarts=1, max_task_retries=0).remote()
    attempts = str(tmp_path / "attempts")
    ref = slow.block.remote(attempts, gate.path("pid"), gate.release_file)
    pid = int(gate.wait_mark("pid"))
    sigkill(pid)
    with pytest.raises(ActorDiedError):
        redray.get(ref, timeout=20)
    assert count_lines(attempts) == 1  # not retried
    # The actor itself restarted.
    assert wait_new_pid(slow, pid) != pid


def test_call_in_flight_with_task_retry_succeeds_after_restart(cluster, gate, tmp_path):
    slow = Slow.options(max_restarts=1, max_task_retries=1).remote()
    attempts = str(tmp_path / "attempts")
    ref = slow.block.remote(attempts, gate.path("pid"), gate.release_file)
    pid = int(gate.wait_mark("pid"))
    # Calls submitted right behind it, before and after the kill: nothing may be lost.
    behind = [slow.incr.remote() for _ in range(20)]
    sigkill(pid)
    after = [slow.incr.remote() for _ in range(20)]
    attempt, new_pid = redray.get(ref, timeout=30)
    assert attempt == 2 and new_pid != pid
    values = redray.get(behind + after, timeout=30)
    # State is fresh after the restart and the calls still ran once each, in order.
    assert values == list(range(1, 41))


def pending_calls_at_final_death(gate: Any, tmp_path: Path) -> tuple[str, Any, list]:
    """A max_restarts=1 actor, SIGKILLed twice; the second time with a blocked call and calls
    queued behind it. Returns the actor's name and those pending calls."""
    name = f"final-death-{tmp_path.name}"
    slow = Slow.options(name=name, max_restarts=1).remote()
    first_pid = redray.get(slow.pid.remote())
    sigkill(first_pid)
    second_pid = wait_new_pid(slow, first_pid)
    # The only restart is spent. A blocked call, and calls queued behind it, are pending.
    ref = slow.block.remote(str(tmp_path / "attempts"), gate.path("pid"), gate.release_file)
    assert int(gate.wait_mark("pid")) == second_pid
    pending = [ref, *(slow.incr.remote() for _ in range(10))]
    sigkill(second_pid)
    return name, slow, pending


def test_every_pending_and_future_call_fails_after_last_restart(cluster, gate, tmp_path):
    name, slow, pending = pending_calls_at_final_death(gate, tmp_path)
    for ref in pending:
        with pytest.raises(ActorDiedError):
            redray.get(ref, timeout=20)
    known_dead(name)
    for _ in range(3):
        with pytest.raises(ActorDiedError, match=DEATH_BY_SIGNAL):
            redray.get(slow.incr.remote(), timeout=20)


def test_pending_calls_carry_the_death_cause(cluster, gate, tmp_path):
    _, _, pending = pending_calls_at_final_death(gate, tmp_path)
    for ref in pending:
        with pytest.raises(ActorDiedError, match=DEATH_BY_SIGNAL):
            redray.get(ref, timeout=20)


@pytest.fixture
def forked_helpers() -> Iterator[list[int]]:
    """Pids of helpers forked by Forker actors: SIGKILLed at the end whatever happened."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sigkill_is_noticed_while_a_forked_child_holds_the_sockets(cluster, gate, forked_helpers):
    actor = Forker.options(max_restarts=1).remote()
    pid = redray.get(actor.pid.remote())
    forked_helpers.append(redray.get(actor.fork_helper.remote(gate.release_file)))
    ref = actor.nap.remote(60)
    sigkill(pid)
    with pytest.raises(ActorDiedError):
        redray.get(ref, timeout=3)
    assert wait_new_pid(actor, pid, timeout=3) != pid


@pytest.mark.parametrize(
    ("restarts", "retries"), [(0, 0), (1, 0), (1, 1)], ids=["dead", "restarting", "retried"]
)
def test_calls_in_flight_when_the_new_state_is_published_first(
    cluster, gate, tmp_path, forked_helpers, restarts, retries
):
    """The caller learns of a death twice: its connection closes, and the control loop
    publishes the new state (DEAD, or RESTARTING). Whichever comes first decides the calls in
    flight: failed, or retried on the restarted actor. A forked helper keeps only the
    caller's connection open, so the published state comes first."""
    name = f"dies-before-its-connection-{restarts}-{retries}"
    actor = Forker.options(name=name, max_restarts=restarts, max_task_retries=retries).remote()
    pid = redray.get(actor.pid.remote())
    forked_helpers.append(redray.get(actor.fork_helper.remote(gate.release_file, True)))
    ref = actor.nap_once.remote(str(tmp_path / "attempts"), gate.release_file)
    wait_for(lambda: count_lines(tmp_path / "attempts") == 1, message="the call never started")
    sigkill(pid)
    if restarts == 0:
        known_dead(name)  # the death is recorded (and published) ...
        with pytest.raises(ActorDiedError):  # ... so the call in flight must fail
            redray.get(ref, timeout=5)
    elif retries == 0:
        with pytest.raises(ActorDiedError):
            redray.get(ref, timeout=5)
        assert wait_new_pid(actor, pid) != pid
    else:
        assert redray.get(ref, timeout=10) == 2  # run again on the restarted actor


def test_constructor_exception_fails_every_call(cluster):
    broken = Broken.remote(42)
    for _ in range(3):
        with pytest.raises(RayActorError) as info:
            redray.get(broken.ping.remote(), timeout=20)
        message = str(info.value)
        assert "ValueError" in message
        assert "bad config 42" in message
        assert "__init__" in message  # the constructor's traceback


# -- 7. concurrency --------------------------------------------------------------------------
def test_async_actor_calls_overlap(cluster):
    sleeper = AsyncSleeper.remote()
    redray.get(sleeper.count_started.remote())  # alive
    start = time.monotonic()
    pids = redray.get([sleeper.nap.remote(0.2) for _ in range(50)], timeout=30)
    elapsed = time.monotonic() - start
    assert len(set(pids)) == 1
    assert elapsed < 3.0, f"50 overlapping 0.2 s naps took {elapsed:.2f} s"


@redray.remote
class LoopIdentity:
    """Where an async actor's calls run, and whether the runtime works from there."""

    async def where(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        return threading.current_thread().name, id(loop)

    async def nested(self, n: int) -> list:
        refs = [square.remote(i) for i in range(n)]
        awaited = [await ref for ref in refs[: n // 2]]
        return awaited + redray.get(refs[n // 2 :])  # a blocking get from the loop, too


@redray.remote
def square(x: int) -> int:
    return x * x


def test_async_actor_calls_run_on_its_event_loop_and_can_call_the_runtime(cluster):
    """Calls reach an async actor's event-loop thread directly (it runs the worker's loop
    while idle); every call still runs on that one loop, and awaiting or getting refs from
    a call works."""
    actor = LoopIdentity.remote()
    places = set(redray.get([actor.where.remote() for _ in range(200)], timeout=30))
    assert len(places) == 1
    assert next(iter(places))[0] != "MainThread"
    assert redray.get(actor.nested.remote(10), timeout=30) == [i * i for i in range(10)]
    for _ in range(50):  # synchronous calls one after another
        assert redray.get(actor.where.remote(), timeout=10) in places


def test_async_actor_max_concurrency_limits_overlap(cluster):
    sleeper = AsyncSleeper.options(max_concurrency=2).remote()
    redray.get(sleeper.count_started.remote())
    start = time.monotonic()
    redray.get([sleeper.nap.remote(0.2) for _ in range(6)], timeout=30)
    elapsed = time.monotonic() - start
    # Two at a time: three rounds of 0.2 s, not one.
    assert elapsed >= 0.55, f"6 naps with max_concurrency=2 took only {elapsed:.2f} s"


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_max_concurrency_limits_threaded_overlap(cluster, limit):
    total = 8
    actor = Overlap.options(max_concurrency=limit).remote(total, limit)
    threads = redray.get([actor.work.remote() for _ in range(total)], timeout=60)
    assert redray.get(actor.peak.remote()) == limit
    if limit > 1:
        assert len(set(threads)) > 1  # really on several threads


def test_threaded_actor_runs_calls_at_once(cluster):
    meeting = Meeting.options(max_concurrency=4).remote(4)
    assert sorted(redray.get([meeting.meet.remote() for _ in range(4)], timeout=30)) == [
        0,
        1,
        2,
        3,
    ]


def test_concurrency_groups(cluster, gate):
    actor = Grouped.remote()
    compute = actor.compute.remote(gate.path("started1"), gate.release_file)
    gate.wait_mark("started1")
    # The compute group is busy; io calls go on meanwhile, two at once.
    assert redray.get([actor.io.remote(i) for i in range(10)], timeout=10) == [
        2 * i for i in range(10)
    ]
    assert sorted(redray.get([actor.io_meet.remote() for _ in range(2)], timeout=15)) == [0, 1]
    # "compute" runs one at a time: a second one waits for the first.
    second = actor.compute.remote(gate.path("started2"), gate.release_file)
    assert redray.wait([compute, second], timeout=0.5) == ([], [compute, second])
    assert not os.path.exists(gate.path("started2"))
    gate.open()
    assert redray.get([compute, second], timeout=20) == ["computed", "computed"]


def test_cancel_async_actor_call(cluster):
    sleeper = AsyncSleeper.remote()
    ref = sleeper.forever.remote()
    wait_for(lambda: redray.get(sleeper.count_started.remote()) == 1, message="never started")
    redray.cancel(ref)
    with pytest.raises(TaskCancelledError):
        redray.get(ref, timeout=20)
    # The actor goes on serving.
    assert isinstance(redray.get(sleeper.nap.remote(0.01), timeout=20), int)


@pytest.mark.parametrize(
    "cls",
    [
        Blockable,
        AsyncBlockable,
    ],
    ids=["plain", "async"],
)
def test_cancel_a_queued_actor_call(cluster, gate, cls):
    actor = cls.options(max_concurrency=1).remote()
    running = actor.block.remote(gate.path("started"), gate.release_file)
    gate.wait_mark("started")
    queued = actor.record.remote("queued")
    redray.cancel(queued)
    gate.open()
    assert redray.get(running, timeout=20) == "unblocked"
    with pytest.raises(TaskCancelledError):
        redray.get(queued, timeout=3)
    assert redray.get(actor.runs.remote(), timeout=20) == []  # it never ran


def test_force_cancel_of_an_actor_call_is_an_error(cluster):
    counter = Counter.remote()
    ref = counter.incr.remote()
    with pytest.raises(ValueError, match="force"):
        redray.cancel(ref, force=True)


def test_async_concurrency_groups_limit_overlap(cluster):
    actor = AsyncGrouped.remote()
    redray.get([actor.io.remote() for _ in range(8)], timeout=20)
    assert redray.get(actor.max_inside.remote()) == 2
    redray.get([actor.unlimited.remote() for _ in range(8)], timeout=20)
    assert redray.get(actor.max_inside.remote()) > 2  # the default group: up to 1000


def test_concurrency_group_chosen_per_call(cluster, gate):
    actor = TwoGroups.remote()
    blocked = actor.wait_gate.remote(gate.path("started-a"), gate.release_file)
    gate.wait_mark("started-a")
    other = gate.dir / "other"
    other.mkdir()
    (other / "release").touch()
    moved = actor.wait_gate.options(concurrency_group="b").remote(
        str(other / "started-b"), str(other / "release")
    )
    try:
        assert redray.get(moved, timeout=3).startswith("b")
    finally:
        gate.open()
        redray.get(blocked, timeout=20)


@pytest.mark.parametrize(
    ("cls", "blocker"),
    [
        (ThreadedGroups, "block_in_g1"),
        (ThreadedGroups, "block_in_default"),
        (AsyncGroups, "block_in_g1"),
        (AsyncGroups, "block_in_default"),
    ],
    ids=["threaded-g1", "threaded-default", "async-g1", "async-default"],
)
def test_a_concurrency_group_runs_while_another_is_blocked(cluster, gate, cls, blocker):
    """Each group has its own threads (threaded actors) or its own event loop in its own
    thread (async actors), so calls blocking one group never hold up another."""
    actor = cls.remote()
    blocked = [
        getattr(actor, blocker).remote(gate.path(f"started{i}"), gate.release_file)
        for i in range(2)
    ]
    gate.wait_mark("started0")
    try:
        in_g2 = redray.get(actor.in_g2.remote(), timeout=5)
        if cls is AsyncGroups:
            assert in_g2 == "AsyncIO Thread: g2"
            if blocker == "block_in_g1":
                assert redray.get(actor.in_default.remote(), timeout=5) == (
                    "AsyncIO Thread: default"
                )
    finally:
        gate.open()
    names = redray.get(blocked, timeout=20)
    assert len(set(names)) == 1 and in_g2 not in names
    if cls is AsyncGroups:  # a synchronous method runs on its group's loop thread, as in Ray
        group = "g1" if blocker == "block_in_g1" else "default"
        assert names[0] == f"AsyncIO Thread: {group}"


# -- 8. resources, runtime_env, logs ----------------------------------------------------------
def test_default_actors_hold_no_cpu_while_running(cluster):
    wait_available_cpus(2.0)
    actors = [Counter.remote(i) for i in range(4)]
    assert redray.get([a.get.remote() for a in actors], timeout=30) == [0, 1, 2, 3]
    wait_available_cpus(2.0)
    # Tasks still get both CPUs.
    assert redray.get(incr_all.remote(actors[:2], 1), timeout=30) == [1, 2]
    # An actor asking for a CPU holds it while it lives.
    holder = Counter.options(num_cpus=1).remote()
    pid = redray.get(holder.pid.remote())
    wait_available_cpus(1.0)
    redray.kill(holder)
    wait_gone(pid)
    wait_available_cpus(2.0)


def test_actors_needing_a_cpu_wait_for_one(cluster):
    wait_available_cpus(2.0)
    holders = [Counter.options(num_cpus=1).remote(i) for i in range(3)]
    refs = [h.get.remote() for h in holders]
    ready, waiting = redray.wait(refs, num_returns=2, timeout=20)
    assert len(ready) == 2
    # Two CPUs: the third actor is not placed while the other two live.
    assert redray.wait(waiting, timeout=0.5) == ([], waiting)
    placed = [holders[refs.index(r)] for r in ready]
    redray.kill(placed[0])
    assert redray.get(waiting[0], timeout=20) in (0, 1, 2)
    for h in holders:
        redray.kill(h)
    wait_available_cpus(2.0)


def test_actor_runtime_env_env_vars(cluster):
    env = {"env_vars": {"REDRAY_ACTOR_VAR": "hello", "OTHER_ACTOR_VAR": "a=b"}}
    counter = Counter.options(runtime_env=env).remote()
    assert redray.get(counter.env.remote("REDRAY_ACTOR_VAR")) == "hello"
    assert redray.get(counter.env.remote("OTHER_ACTOR_VAR")) == "a=b"

    @redray.remote(runtime_env={"env_vars": {"REDRAY_ACTOR_VAR": "decorated"}})
    class Decorated:
        def env(self, name):
            return os.environ.get(name)

    assert redray.get(Decorated.remote().env.remote("REDRAY_ACTOR_VAR")) == "decorated"
    assert redray.get(Counter.remote().env.remote("REDRAY_ACTOR_VAR")) is None


def test_actor_prints_reach_the_driver_prefixed(cluster):
    proc = run_driver(
        f"""
        import json, os, redray
        redray.init(address={cluster_address(cluster)!r})

        @redray.remote
        class Talker:
            def __init__(self):
                print("constructed")
            def say(self, text):
                print(text)
                return os.getpid()

        talker = Talker.remote()
        pid = redray.get(talker.say.remote("hello from an actor"))
        print(json.dumps({{"pid": pid}}))
        """,
        timeout=60,
    )
    pid = last_json(proc.stdout)["pid"]
    assert f"(Talker pid={pid}) hello from an actor" in proc.stdout
    assert f"(Talker pid={pid}) constructed" in proc.stdout


def test_errors_are_ray_errors():
    """The actor errors used above sit in Ray's hierarchy."""
    assert issubclass(ActorDiedError, RayActorError) and issubclass(RayActorError, RayError)


def test_ray_module_paths_after_a_bare_import():
    """Ray's __init__ imports ray.actor and ray.util: scripts use them after `import ray`."""
    proc = run_driver(
        """
        import redray as ray
        print(ray.util.list_named_actors, ray.actor.exit_actor, ray.util.ActorPool)
        """,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
