"""redray.util.multiprocessing.Pool: the standard library's Pool API over actors (2 CPUs).

The same script runs with `from multiprocessing import Pool` and with redray's Pool and must
print the same; the other tests cover what only a cluster pool does (terminate killing its
actors, spreading across nodes, lazy imap, connecting without init).
"""

from __future__ import annotations

import itertools
import multiprocessing
import multiprocessing.pool
import os

import psutil
import pytest
from conftest import Gate, _ensure_cluster, block_until, last_json, run_driver, wait_for

import redray
from redray.exceptions import ActorDiedError
from redray.gcs import Gcs
from redray.node import launch as node_mod
from redray.util.multiprocessing import Pool, TimeoutError
from redray.util.multiprocessing.dispatch import DEPTH
from redray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

pytestmark = [pytest.mark.usefixtures("ray_start"), pytest.mark.timeout(60)]

# A program written for multiprocessing.Pool; IMPORT is its only line that changes.
PROGRAM = """
import json, os, time
IMPORT

SCALE = None

def set_scale(value):
    global SCALE
    SCALE = value

def scaled(x):
    return SCALE * x

def square(x):
    # later items finish first, so ordered results cannot come from finishing order
    time.sleep(0.002 * (12 - x))
    return x * x

def checked(x):
    if x == 5:
        raise ValueError(f"bad item {x}")
    return x

def pid(_):
    return os.getpid()

def nap(_):
    time.sleep(60)

if __name__ == "__main__":
    out = {}
    with Pool(2, initializer=set_scale, initargs=(3,)) as pool:
        out["map"] = pool.map(square, range(12))
        out["map_chunked"] = pool.map(square, range(12), chunksize=5)
        out["imap"] = list(pool.imap(square, range(12)))
        out["imap_chunked"] = list(pool.imap(square, range(12), chunksize=4))
        out["imap_unordered"] = sorted(pool.imap_unordered(square, range(12), chunksize=2))
        out["starmap"] = pool.starmap(divmod, [(7, 2), (9, 4)])
        out["starmap_async"] = pool.starmap_async(pow, [(2, 5)]).get(timeout=30)
        out["apply"] = pool.apply(divmod, (17, 5))
        out["apply_kwds"] = pool.apply(int, ("ff",), {"base": 16})
        out["initializer"] = pool.map(scaled, [1, 2, 3])
        seen = []
        result = pool.map_async(square, [1, 2], callback=seen.append)
        result.wait(timeout=30)
        out["map_async"] = [result.get(), result.ready(), result.successful(), seen]
        single = pool.apply_async(square, (4,), callback=seen.append)
        out["apply_async"] = [single.get(timeout=30), seen]
        try:
            pool.map(checked, range(10), chunksize=2)
        except ValueError as exc:
            out["map_error"] = [type(exc).__name__, str(exc), type(exc.__cause__).__name__]
        errors = []
        failed = pool.map_async(checked, range(10), error_callback=errors.append)
        failed.wait(timeout=30)
        out["error_callback"] = [failed.successful(), [str(e) for e in errors]]
        imap_seen = []
        iterator = pool.imap(checked, range(7))
        for _ in range(7):
            try:
                imap_seen.append(next(iterator))
            except ValueError as exc:
                imap_seen.append(str(exc))
        out["imap_error"] = imap_seen
        pool.map_async(nap, range(4), chunksize=1)
        started = time.monotonic()
    # leaving the block terminated the pool, and its busy processes with it
    out["terminate_fast"] = time.monotonic() - started < 10
    try:
        pool.map(square, [1])
    except ValueError as exc:
        out["after_terminate"] = str(exc)
    pool.join()
    pool = Pool(2, maxtasksperchild=1)
    out["maxtasksperchild"] = len(set(pool.map(pid, range(4), chunksize=1)))
    pool.close()
    pool.join()
    try:
        pool.apply(square, (1,))
    except ValueError as exc:
        out["after_close"] = str(exc)
    print(json.dumps(out, sort_keys=True))
"""


def _run_program(import_line: str) -> dict:
    proc = run_driver(PROGRAM.replace("IMPORT", import_line), timeout=90)
    return last_json(proc.stdout)


@pytest.mark.timeout(120)
def test_stdlib_pool_program_runs_unchanged_but_for_its_import():
    expected = _run_program("from multiprocessing import Pool")
    # Not connected, as the program never calls init: the pool starts a cluster, as Ray's.
    got = _run_program("from redray.util.multiprocessing import Pool")
    assert got == expected
    # What the standard library prints, for the record of what both must do.
    assert expected["imap"] == [x * x for x in range(12)]
    assert expected["map_error"] == ["ValueError", "bad item 5", "RemoteTraceback"]
    assert expected["maxtasksperchild"] == 4
    assert expected["after_terminate"] == expected["after_close"] == "Pool not running"


# -- functions the in-process tests map ------------------------------------------------------
class Rejected(Exception):
    pass


def reject_odd(x):
    if x % 2:
        raise Rejected(f"odd: {x}")
    return x


def identity(x):
    return x


def gated(release_file):
    return block_until(release_file)


def actor_pid(_):
    return os.getpid()


def node_of(_):
    return redray.get_runtime_context().get_node_id()


@redray.remote(num_cpus=0)
def node_of_task():
    return redray.get_runtime_context().get_node_id()


@pytest.fixture(scope="module")
def pool():
    """One pool for the tests that need no pool life cycle of their own."""
    _ensure_cluster(num_cpus=2)
    with Pool(2) as shared:
        yield shared


def test_exception_in_map_is_the_callers_type_with_remote_traceback(pool):
    with pytest.raises(Rejected, match="odd: 1") as caught:
        pool.map(reject_odd, range(4), chunksize=1)
    cause = caught.value.__cause__
    assert isinstance(cause, multiprocessing.pool.RemoteTraceback)
    assert "reject_odd" in str(cause)
    # The pool keeps working after a failed map.
    assert pool.map(identity, range(3)) == [0, 1, 2]


def test_imap_reads_its_iterable_lazily(pool):
    produced = []

    def endless():
        for number in itertools.count():
            produced.append(number)
            yield number

    numbers = pool.imap(identity, endless(), chunksize=3)
    assert [next(numbers) for _ in range(10)] == list(range(10))
    # Read ahead by a bounded window of chunks only (a few per actor), not without end.
    assert len(produced) <= 10 + 3 * 2 * DEPTH * 2

    def broken():
        yield 1
        raise Rejected("iterable broke")

    results = pool.imap(identity, broken())
    assert next(results) == 1
    with pytest.raises(Rejected, match="iterable broke"):
        next(results)


def test_async_result_states_and_timeouts(pool, tmp_path):
    gate = Gate(tmp_path / "gate")
    result = pool.apply_async(gated, (gate.release_file,))
    with pytest.raises(TimeoutError):
        result.get(timeout=0.2)
    assert TimeoutError is multiprocessing.TimeoutError
    assert not result.ready()
    with pytest.raises(ValueError, match="not ready"):
        result.successful()
    iterator = pool.imap(gated, [gate.release_file])
    with pytest.raises(TimeoutError):
        iterator.next(timeout=0.2)
    gate.open()
    assert result.get(timeout=30) is True
    assert result.ready() and result.successful()
    assert iterator.next(timeout=30) is True
    with pytest.raises(StopIteration):
        next(iterator)


def test_terminate_kills_the_actors_and_fails_outstanding_work(tmp_path):
    gate = Gate(tmp_path / "gate")
    pool = Pool(2)
    pids = set(pool.map(actor_pid, range(8), chunksize=1))
    assert len(pids) == 2
    outstanding = pool.map_async(gated, [gate.release_file] * 6, chunksize=1)
    pool.terminate()
    with pytest.raises(ActorDiedError):
        outstanding.get(timeout=20)
    wait_for(lambda: not any(psutil.pid_exists(pid) for pid in pids), timeout=20)
    with pytest.raises(ValueError, match="Pool not running"):
        pool.map(identity, [1])
    pool.join()
    gate.open()


def test_close_lets_work_finish_then_the_actors_exit():
    pool = Pool(2)
    pids = set(pool.map(actor_pid, range(4), chunksize=1))
    pending = pool.map_async(identity, range(20), chunksize=1)
    pool.close()
    pool.join()
    assert pending.get(timeout=0) == list(range(20))
    wait_for(lambda: not any(psutil.pid_exists(pid) for pid in pids), timeout=20)


def test_invalid_arguments_are_refused():
    with pytest.raises(ValueError, match="only 2 CPUs"):
        Pool(3)
    with pytest.raises(ValueError, match="must be >0"):
        Pool(0)
    with pytest.raises(ValueError, match="maxtasksperchild"):
        Pool(1, maxtasksperchild=0)
    with pytest.raises(TypeError, match="initializer"):
        Pool(1, initializer=5)
    with Pool(1) as pool:
        with pytest.raises(ValueError, match="Chunksize"):
            pool.imap(identity, [1], chunksize=0)
        with pytest.raises(ValueError, match="still running"):
            pool.join()
        assert pool.map(identity, []) == []


@pytest.fixture
def second_node(ray_start):
    """A node with 1 CPU joined to the module's cluster for one test."""
    gcs = Gcs(ray_start["address"])
    token = gcs.cluster_token()
    gcs.close()
    ip = "127.0.0.2"
    started = node_mod.start_node(
        head=False,
        token=token,
        cluster="default",
        resources=node_mod.default_resources(1, None, None, ip, head=False),
        object_store_memory=64 * 1024 * 1024,
        node_ip_address=ip,
        gcs_url=ray_start["address"],
        private=True,
    )
    node_id = started.info["node_id"]
    # Soft affinity falls back to any node while the head's raylet has not heard of the new
    # one; a task with strict affinity waits until it has.
    on_it = NodeAffinitySchedulingStrategy(node_id, soft=False)
    assert redray.get(node_of_task.options(scheduling_strategy=on_it).remote(), timeout=30) == (
        node_id
    )
    yield started
    started.stop()
    node_mod.remove_session_dir(started.session_dir)
    wait_for(lambda: redray.cluster_resources().get("CPU") == 2, timeout=30)


def test_pool_actors_spread_over_the_nodes_by_their_cpus(second_node):
    with Pool() as pool:
        assert len(pool._dispatcher) == 3
        nodes = pool.map(node_of, range(30), chunksize=1)
    assert set(nodes) == {n["NodeID"] for n in redray.nodes() if n["Alive"]}
    assert second_node.info["node_id"] in nodes
