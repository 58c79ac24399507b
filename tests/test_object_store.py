"""The shared-memory object store on a real cluster: zero-copy reads, capacity and spilling,
reference counting across processes, owner death and clean-up (issue 4, "Must show").

One small cluster (2 CPUs, a 500 MiB store) is shared by the module so that spilling is
reached with a few 100 MiB objects. Every test starts from an empty store and measures
against the raylet's own counters (`store_stats`); waits poll a condition with a deadline.
Tests that need their own cluster life cycle (shutdown, a driver that is SIGKILLed) run a
driver in a subprocess.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zlib

import numpy as np
import psutil
import pytest
from conftest import (
    REPO,
    _ensure_cluster,
    _shutdown_cluster,
    block_until,
    last_json,
    mark,
    redray_shm_files,
    run_driver,
    wait_for,
)
from test_multinode import LocalCluster, node_ids

import redray
from redray.core import context
from redray.exceptions import ObjectLostError, OwnerDiedError
from redray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

MiB = 1 << 20
STORE = 500 * MiB  # small on purpose: a handful of 100 MiB objects make it spill


# -- helpers ---------------------------------------------------------------------------------
def store_stats() -> dict:
    """The raylet's object store counters (used, capacity, pinned, spilled, ...)."""
    worker = context.current
    return worker.peers.call(worker.raylet, "store_stats", timeout=10)


def wait_store(predicate, timeout: float = 10.0, message: str = "") -> dict:
    """Poll the store's counters until predicate(stats) holds; return those stats."""
    seen: list[dict] = []

    def check():
        stats = store_stats()
        seen[:] = [stats]
        return stats if predicate(stats) else None

    try:
        return wait_for(check, timeout, interval=0.01)
    except AssertionError:
        raise AssertionError(f"{message or predicate}: last stats {seen[-1]}") from None


def wait_empty(base: dict | None = None, timeout: float = 10.0) -> dict:
    """Wait until the store is back to `base` (default: empty): memory, objects, disk."""
    used = base["used"] if base else 0
    objects = base["num_objects"] if base else 0

    def back(s):
        return s["used"] == used and s["num_objects"] == objects and s["disk_bytes"] == 0

    return wait_store(back, timeout, "the store never got back to its baseline")


def pattern(seed: int, nbytes: int) -> np.ndarray:
    """A distinct, position-dependent uint64 array of nbytes (a known pattern per seed)."""
    arr = np.arange(nbytes // 8, dtype=np.uint64)
    arr *= np.uint64(2 * seed + 1)
    arr += np.uint64(seed)
    return arr


def crc(arr: np.ndarray) -> int:
    return zlib.crc32(memoryview(arr).cast("B"))


def uss() -> int:
    return psutil.Process().memory_full_info().uss


def sync_driver_refs() -> None:
    """Make this driver tell its raylet/owners about refs it dropped (as get/put do)."""
    gc.collect()
    context.current.ownership.process_released()


@pytest.fixture
def cluster():
    """The module's cluster, with an empty store (a fresh cluster if a test leaked)."""
    ctx = _ensure_cluster(num_cpus=2, object_store_memory=STORE)
    gc.collect()
    try:
        wait_empty(timeout=5)
    except AssertionError:
        _shutdown_cluster()
        ctx = _ensure_cluster(num_cpus=2, object_store_memory=STORE)
    return ctx


# -- remote functions and actors -------------------------------------------------------------
@redray.remote(num_cpus=0.5)
def read_and_measure(box, started_file=None, release_file=None):
    """Get the array in box, touch every page; report unique-memory growth and a checksum."""
    before = uss()
    arr = redray.get(box[0])
    total = int(arr.view(np.uint64).sum(dtype=np.uint64))
    grown = uss() - before
    writeable = arr.flags.writeable
    try:
        arr[0] = 1
        write_error = None
    except ValueError as exc:
        write_error = str(exc)
    if started_file is not None:
        mark(started_file)
        block_until(release_file)
    return {"grown": grown, "sum": total, "writeable": writeable, "write_error": write_error}


@redray.remote
def copy_and_measure(box):
    """The control: a private copy of the same array must show up in USS."""
    arr = redray.get(box[0])
    before = uss()
    copy = np.array(arr)
    copy.view(np.uint64).sum()
    return uss() - before


@redray.remote
def checksum(arr):
    return crc(arr)


@redray.remote
def checksum_nested(box, started_file, release_file):
    mark(started_file)
    if not block_until(release_file):
        return None
    return crc(redray.get(box[0]))


@redray.remote
def wait_gate(release_file):
    return block_until(release_file)


@redray.remote
def checksum_after(arr, _dependency):
    return crc(arr)


@redray.remote
def put_and_return_nested(seed, nbytes, count=1):
    """A pool worker becomes the owner of large objects; the caller borrows them."""
    return [redray.put(pattern(seed + i, nbytes)) for i in range(count)], os.getpid()


@redray.remote
def put_in_task(nbytes):
    return redray.put(np.zeros(nbytes, dtype=np.uint8)) is not None


@redray.remote
def make_array(seed, nbytes):
    return pattern(seed, nbytes)


@redray.remote
def many_refs(n):
    return [redray.put(i) for i in range(n)]


@redray.remote
def many_store_refs_in_one(n, nbytes):
    """A worker owns n store objects and one small object listing them; returns a ref to it."""
    refs = [redray.put(np.full(nbytes, i % 251, np.uint8)) for i in range(n)]
    return [redray.put(refs)]


@redray.remote(num_cpus=0)
class Holder:
    """A borrower that keeps a ref (or a zero-copy view) in its state."""

    def __init__(self):
        self.ref = None
        self.view = None

    def pid(self):
        return os.getpid()

    def hold(self, box):
        self.ref = box[0]
        return True

    def checksum(self):
        return crc(redray.get(self.ref))

    def pin_view(self, box):
        self.view = redray.get(box[0])
        return crc(self.view)

    def drop(self):
        self.ref = None
        return True


@redray.remote(num_cpus=0)
class Owner:
    """Puts objects it owns and hands them out nested in a list."""

    def pid(self):
        return os.getpid()

    def make(self, seed, nbytes):
        return [redray.put(pattern(seed, nbytes))]


@redray.remote(num_cpus=0)
class RemoteOwner:
    """Owns an object it had a task make on another node."""

    def pid(self):
        return os.getpid()

    def make_on(self, strategy, seed, nbytes):
        ref = make_array.options(scheduling_strategy=strategy).remote(seed, nbytes)
        redray.wait([ref], timeout=120)
        return [ref]


# -- 1. zero-copy reads ----------------------------------------------------------------------
def test_read_on_same_node_is_zero_copy_and_read_only(cluster):
    size = 300 * MiB
    arr = pattern(0, size)
    expected_sum = int(arr.sum(dtype=np.uint64))
    ref = redray.put(arr)
    del arr  # the store's copy (mapped and written by this driver) is what readers share
    box = [ref]

    seen = redray.get(read_and_measure.remote(box))
    assert seen["sum"] == expected_sum
    assert seen["writeable"] is False
    assert seen["write_error"] is not None and "read-only" in seen["write_error"]
    # Reading every page of a 300 MiB object must not cost the reader 300 MiB of its own.
    assert seen["grown"] < size // 20, seen
    # The measurement does see a private copy (so the assertion above means something).
    assert redray.get(copy_and_measure.remote(box)) > size * 0.9

    local = redray.get(ref)
    assert not local.flags.writeable
    with pytest.raises(ValueError):
        local[0] = 1
    del local


def test_concurrent_readers_share_one_copy(cluster, gate):
    size = 300 * MiB
    arr = pattern(1, size)
    expected_sum = int(arr.sum(dtype=np.uint64))
    ref = redray.put(arr)
    del arr
    base = store_stats()
    readers = 3
    out = [
        read_and_measure.remote([ref], gate.path(f"reader{i}"), gate.release_file)
        for i in range(readers)
    ]
    for i in range(readers):
        gate.wait_mark(f"reader{i}")
    # All three hold a view now: the store still has exactly one copy, pinned.
    during = store_stats()
    assert during["used"] == base["used"]
    assert during["num_objects"] == 1
    assert during["pinned_bytes"] >= size
    gate.open()
    results = redray.get(out, timeout=60)
    assert all(r["sum"] == expected_sum for r in results)
    assert all(r["writeable"] is False for r in results)
    grown = sum(r["grown"] for r in results)
    assert grown < size // 10, [r["grown"] for r in results]  # far below 3 x 300 MiB
    wait_store(lambda s: s["num_pinned"] == 0, message="readers' pins were never released")


# -- 2. capacity: put/drop loop --------------------------------------------------------------
def test_put_drop_loop_of_ten_times_capacity_stays_within_capacity(cluster):
    chunk = np.ones(100 * MiB, dtype=np.uint8)
    before = store_stats()
    capacity, spilled_before = before["capacity"], before["spilled_objects"]
    assert capacity == STORE
    written = peak = 0
    i = 0
    while written < 10 * capacity:
        chunk[:8] = i % 256
        ref = redray.put(chunk)
        stats = store_stats()
        peak = max(peak, stats["used"])
        assert stats["used"] <= capacity
        # Dropped objects are freed, not spilled (the store always has room for two).
        assert stats["num_objects"] <= 2, stats
        assert stats["spilled_objects"] == spilled_before, stats
        if i % 10 == 0:
            view = redray.get(ref)
            assert view[0] == i % 256 and view[-1] == 1
            del view
        del ref
        written += chunk.nbytes
        i += 1
    assert i >= 50
    assert peak <= capacity
    final = wait_empty()
    assert not os.path.isdir(final["spill_dir"]) or os.listdir(final["spill_dir"]) == []


# -- 3. spilling and restoring ---------------------------------------------------------------
def test_spilled_objects_come_back_identical(cluster):
    size, count = 100 * MiB, 8  # 800 MiB through a 500 MiB store, every ref held
    refs, crcs = [], []
    for seed in range(count):
        arr = pattern(seed, size)
        crcs.append(crc(arr))
        refs.append(redray.put(arr))
        del arr
    stats = store_stats()
    assert stats["used"] <= STORE
    assert stats["num_objects"] == count
    assert stats["num_spilled"] >= 3, stats
    assert stats["spilled_bytes"] >= 3 * size
    assert stats["disk_bytes"] >= 3 * size
    spill_dir = stats["spill_dir"]
    on_disk = sum(os.path.getsize(os.path.join(spill_dir, f)) for f in os.listdir(spill_dir))
    assert on_disk == stats["disk_bytes"]

    for seed in range(count):  # in put order: the oldest were spilled first
        value = redray.get(refs[seed])
        assert value.dtype == np.uint64 and value.nbytes == size
        assert crc(value) == crcs[seed], f"object {seed} changed"
        probe = np.array([0, 1, size // 16, size // 8 - 1], dtype=np.uint64)
        assert np.array_equal(value[probe], probe * np.uint64(2 * seed + 1) + np.uint64(seed))
        del value
    # Read again by another process, in reverse order (which spills and restores again).
    assert redray.get([checksum.remote(r) for r in reversed(refs)]) == crcs[::-1]
    after = store_stats()
    assert after["restored_objects"] - stats["restored_objects"] >= 3
    assert after["used"] <= STORE

    del refs
    wait_empty()
    assert os.listdir(spill_dir) == []


# -- 4. objects the arena cannot hold: created on disk (Ray's fallback allocation) ------------
def test_put_when_pinned_objects_fill_the_store_goes_to_disk(cluster):
    size = 110 * MiB
    refs = [redray.put(np.full(size, i, dtype=np.uint8)) for i in range(4)]
    # Refs alone pin nothing: more puts spill.
    extra = [redray.put(np.full(size, 10 + i, dtype=np.uint8)) for i in range(2)]
    assert store_stats()["num_spilled"] >= 1

    views = [redray.get(r) for r in refs]  # 440 MiB pinned by live views
    wait_store(lambda s: s["pinned_bytes"] >= 4 * size)
    assert store_stats()["num_spilled"] == 2  # the extra objects made room for the views
    # A spilled object that cannot be restored for lack of room is read from its file.
    restored = store_stats()["restored_objects"]
    assert redray.get(checksum.remote(extra[1])) == crc(np.full(size, 11, dtype=np.uint8))
    assert store_stats()["restored_objects"] == restored
    del extra
    before = wait_store(lambda s: s["num_objects"] == 4 and s["num_spilled"] == 0)
    # No room can be made: the object gets a file of its own instead of an error.
    ref = redray.put(np.full(size, 99, dtype=np.uint8))
    after = store_stats()
    assert after["used"] == before["used"] and after["num_unsealed"] == 0
    assert after["fallback_objects"] == before["fallback_objects"] + 1
    assert after["disk_bytes"] >= before["disk_bytes"] + size
    value = redray.get(ref)
    assert value[0] == 99 and value[-1] == 99 and not value.flags.writeable
    del value
    assert redray.get(checksum.remote(ref)) == crc(np.full(size, 99, dtype=np.uint8))
    # In a task, too (the task's own put, freed when the task's ref dies).
    assert redray.get(put_in_task.remote(size), timeout=30) is True

    del ref
    wait_store(lambda s: s["disk_bytes"] == before["disk_bytes"], message="its file was kept")
    del views[0]  # one view released: its object can be spilled, so a put fits in memory
    wait_store(lambda s: s["pinned_bytes"] <= 3 * size + MiB)
    ref = redray.put(np.full(size, 98, dtype=np.uint8))
    assert store_stats()["fallback_objects"] == after["fallback_objects"] + 1  # the task's
    assert redray.get(checksum.remote(ref)) == crc(np.full(size, 98, dtype=np.uint8))
    first = redray.get(refs[0])  # restored from disk
    assert first[0] == 0 and first[-1] == 0
    del first, views, ref, refs
    wait_empty()


def test_object_larger_than_the_store_via_put_and_task_return(cluster):
    base = store_stats()
    size = STORE + 100 * MiB
    arr = pattern(40, size)
    expected = crc(arr)
    ref = redray.put(arr)
    del arr
    stats = store_stats()
    assert stats["used"] == base["used"] and stats["num_objects"] == base["num_objects"] + 1
    assert stats["fallback_objects"] == base["fallback_objects"] + 1
    assert stats["disk_bytes"] >= size
    spill_dir = stats["spill_dir"]
    assert any(os.path.getsize(os.path.join(spill_dir, f)) >= size for f in os.listdir(spill_dir))

    value = redray.get(ref)  # mapped from its file: zero-copy, read-only
    assert crc(value) == expected and value.nbytes == size and not value.flags.writeable
    with pytest.raises(ValueError):
        value[0] = 1
    del value
    assert redray.get(checksum.remote(ref)) == expected  # and by another process

    returned = make_array.remote(41, size)
    assert redray.get(checksum.remote(returned), timeout=60) == crc(pattern(41, size))
    assert crc(redray.get(returned)) == crc(pattern(41, size))
    assert store_stats()["fallback_objects"] == base["fallback_objects"] + 2

    del ref, returned
    after = wait_empty(base)  # memory, objects and the files on disk
    assert os.listdir(after["spill_dir"]) == []


# -- 5. reference counting -------------------------------------------------------------------
def test_object_freed_when_owner_drops_last_ref(cluster):
    base = store_stats()
    ref = redray.put(np.ones(50 * MiB, dtype=np.uint8))
    copy = ref  # a second ref in the same process
    assert store_stats()["num_objects"] == base["num_objects"] + 1
    del ref
    sync_driver_refs()
    assert store_stats()["num_objects"] == base["num_objects"] + 1
    view = redray.get(copy)
    del copy  # the last ref goes while a view is alive: the object stays until the view goes
    sync_driver_refs()
    # Gone from the table, but its memory stays while it is mapped here.
    wait_store(lambda s: s["num_objects"] == base["num_objects"] and s["used"] > base["used"])
    assert view[0] == 1 and view[-1] == 1
    del view
    wait_empty(base)


def test_large_task_return_freed_when_caller_drops_it(cluster):
    ref = make_array.remote(14, 64 * MiB)
    assert crc(redray.get(ref)) == crc(pattern(14, 64 * MiB))
    assert store_stats()["num_objects"] == 1
    del ref
    wait_empty()


def test_object_put_by_a_task_lives_on_with_the_caller_borrowing_it(cluster):
    box, _pid = redray.get(put_and_return_nested.remote(15, 64 * MiB))
    # The task ended (its own ref died with it): the caller's borrow keeps the object.
    assert redray.get(checksum.remote(box[0])) == crc(pattern(15, 64 * MiB))
    assert crc(redray.get(box[0])) == crc(pattern(15, 64 * MiB))
    assert store_stats()["num_objects"] == 1
    del box
    wait_empty()  # the borrow is returned and the owning worker frees it


def test_running_task_with_nested_ref_keeps_object_alive(cluster, gate):
    arr = pattern(5, 64 * MiB)
    expected = crc(arr)
    ref = redray.put(arr)
    del arr
    out = checksum_nested.remote([ref], gate.path("started"), gate.release_file)
    gate.wait_mark("started")
    del ref
    sync_driver_refs()
    assert store_stats()["num_objects"] == 1
    gate.open()  # the task gets the object only now, after the driver dropped its ref
    assert redray.get(out, timeout=30) == expected
    del out
    wait_empty()


def test_pending_task_argument_keeps_object_alive(cluster, gate):
    arr = pattern(6, 64 * MiB)
    expected = crc(arr)
    ref = redray.put(arr)
    del arr
    dependency = wait_gate.remote(gate.release_file)
    out = checksum_after.remote(ref, dependency)  # waits for its other argument
    del ref
    sync_driver_refs()
    assert store_stats()["num_objects"] == 1
    gate.open()
    assert redray.get(out, timeout=30) == expected
    del out, dependency
    wait_empty()


def test_actor_borrowing_a_ref_keeps_object_alive_until_it_drops_it(cluster):
    arr = pattern(7, 64 * MiB)
    expected = crc(arr)
    ref = redray.put(arr)
    del arr
    holder = Holder.remote()
    assert redray.get(holder.hold.remote([ref]))
    del ref
    sync_driver_refs()
    assert redray.get(holder.checksum.remote(), timeout=30) == expected
    assert store_stats()["num_objects"] == 1
    assert redray.get(holder.drop.remote())
    wait_empty()
    redray.kill(holder)


def test_dead_reader_releases_its_pins(cluster):
    arr = pattern(8, 64 * MiB)
    expected = crc(arr)
    ref = redray.put(arr)
    del arr
    reader = Holder.remote()
    assert redray.get(reader.pin_view.remote([ref])) == expected  # a live view: pinned
    pid = redray.get(reader.pid.remote())
    wait_store(lambda s: s["num_pinned"] == 1)
    os.kill(pid, signal.SIGKILL)
    wait_store(lambda s: s["num_pinned"] == 0, message="a dead reader's pin was never released")
    assert store_stats()["num_objects"] == 1  # the driver still holds its ref
    assert redray.get(checksum.remote(ref)) == expected
    del ref
    wait_empty()


def test_dead_borrower_releases_its_refs(cluster):
    arr = pattern(8, 64 * MiB)
    ref = redray.put(arr)
    del arr
    borrower = Holder.remote()
    assert redray.get(borrower.hold.remote([ref]))
    pid = redray.get(borrower.pid.remote())
    del ref
    sync_driver_refs()
    assert store_stats()["num_objects"] == 1  # the borrower keeps it alive
    os.kill(pid, signal.SIGKILL)
    try:
        wait_empty(timeout=5)
    finally:
        if store_stats()["num_objects"]:
            _shutdown_cluster()  # the leak must not reach the next test


def test_nested_refs_keep_their_referents_alive(cluster):
    inner = redray.put(pattern(9, 32 * MiB))
    expected = crc(pattern(9, 32 * MiB))
    outer = redray.put([inner])  # small: lives with its owner
    big_outer = redray.put({"refs": [inner], "pad": np.zeros(8 * MiB, np.uint8)})
    del inner
    sync_driver_refs()
    assert redray.get(checksum.remote(redray.get(outer)[0])) == expected
    assert store_stats()["num_objects"] == 2  # inner and big_outer
    del outer
    sync_driver_refs()
    assert redray.get(checksum.remote(redray.get(big_outer)["refs"][0])) == expected
    del big_outer
    wait_empty()


def test_refs_dropped_after_wait_are_freed(cluster):
    """wait keeps what it knows of the list it returned; that must not keep refs alive."""
    refs = [redray.put(pattern(20 + i, 8 * MiB)) for i in range(4)]
    ready, not_ready = redray.wait(refs)
    ready, not_ready = redray.wait(not_ready)  # the list wait returned: what it knows is used
    assert (ready, not_ready) == ([refs[1]], refs[2:])
    dropped = not_ready.pop()  # changed in place: the list no longer holds it
    del refs, ready, dropped
    # Well before the watch would be dropped for being idle (waiting.IDLE_SECONDS).
    wait_store(lambda s: s["num_objects"] == 1, 0.5, message="a ref dropped after wait was kept")
    del not_ready
    wait_empty()
    refs = [redray.put(pattern(30 + i, 8 * MiB)) for i in range(2)]
    ready, not_ready = redray.wait(refs)
    del refs, ready
    wait_store(lambda s: s["num_objects"] == 1)
    del not_ready  # the whole list, and no API call follows
    wait_empty(timeout=0.5)


# -- 6. owner death --------------------------------------------------------------------------
def _assert_lost(ref) -> None:
    start = time.monotonic()
    with pytest.raises((OwnerDiedError, ObjectLostError)):
        redray.get(ref, timeout=20)
    assert time.monotonic() - start < 15, "get of a dead owner's object waited for the timeout"


def test_actor_owner_sigkill_frees_its_objects_and_get_raises(cluster):
    base = store_stats()
    owner = Owner.remote()
    pid = redray.get(owner.pid.remote())
    box = redray.get(owner.make.remote(10, 64 * MiB))
    viewed = redray.get(owner.make.remote(11, 64 * MiB))
    view = redray.get(viewed[0])  # read before the owner dies: a live zero-copy view
    expected = crc(pattern(11, 64 * MiB))
    assert store_stats()["num_objects"] == base["num_objects"] + 2

    os.kill(pid, signal.SIGKILL)
    # The unpinned object is freed at once; the one we view stays until the view goes.
    wait_store(lambda s: s["num_objects"] == base["num_objects"], message="owner's objects kept")
    assert crc(view) == expected
    del view
    wait_empty(base)
    _assert_lost(box[0])  # never fetched: the owner is unreachable


def test_get_after_owner_death_of_an_already_fetched_object_raises(cluster):
    base = store_stats()
    owner = Owner.remote()
    pid = redray.get(owner.pid.remote())
    box = redray.get(owner.make.remote(13, 16 * MiB))
    assert crc(redray.get(box[0])) == crc(pattern(13, 16 * MiB))  # its location is known here
    os.kill(pid, signal.SIGKILL)
    wait_empty(base)
    _assert_lost(box[0])


def test_task_owner_sigkill_frees_its_objects_and_spill_files_and_get_raises(cluster):
    base = store_stats()
    box, pid = redray.get(put_and_return_nested.remote(20, 100 * MiB, 6))  # 600 MiB: spills
    during = store_stats()
    assert during["num_objects"] == base["num_objects"] + 6
    assert during["disk_bytes"] >= 100 * MiB, during
    os.kill(pid, signal.SIGKILL)
    after = wait_empty(base)  # memory and spill files
    assert os.listdir(after["spill_dir"]) == []
    _assert_lost(box[0])
    _assert_lost(box[-1])


def test_sigkilled_owner_driver_leaves_no_shared_memory_behind(cluster):
    # The arena is an anonymous memfd: nothing in /dev/shm can outlive its processes.
    assert context.current.node["store"][0] == "memfd"
    shm_before = redray_shm_files()
    base = store_stats()
    script = f"""
        import sys
        import numpy as np
        import redray
        redray.init(address={cluster["address"]!r})
        ref = redray.put(np.ones(100 * 2**20, dtype=np.uint8))
        view = redray.get(ref)
        print("ready", flush=True)
        sys.stdin.read()
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        for line in proc.stdout:  # EOF (a crash) ends the loop too
            if line.strip() == "ready":
                break
        assert proc.poll() is None, "the owner driver died before it was killed"
        during = store_stats()
        assert during["num_objects"] == base["num_objects"] + 1
        assert during["num_pinned"] == base["num_pinned"] + 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        proc.stdout.close()
    after = wait_empty(base)
    assert after["num_pinned"] == base["num_pinned"]
    assert redray_shm_files() - shm_before == set()


# -- 7. objects containing many refs ---------------------------------------------------------
def test_list_of_10k_refs_from_a_task(cluster):
    n = 10_000
    outer = many_refs.remote(n)
    redray.wait([outer], timeout=30)
    start = time.perf_counter()
    inner = redray.get(outer)
    elapsed = time.perf_counter() - start
    assert len(inner) == n and all(isinstance(r, redray.ObjectRef) for r in inner)
    assert elapsed < 1.0, f"get of a list of 10k refs took {elapsed:.2f} s"
    assert redray.get(inner, timeout=30) == list(range(n))
    del inner
    sync_driver_refs()
    # Only the outer object refers to them now: still alive at their owner.
    again = redray.get(outer)
    assert redray.get([again[0], again[n // 2], again[-1]], timeout=30) == [0, n // 2, n - 1]
    assert redray.get(again, timeout=30) == list(range(n))
    del again, outer
    wait_empty()


def test_borrowed_value_with_thousands_of_refs_keeps_them_alive_until_dropped(cluster):
    n = 1500  # above the count at which refs are rebuilt in one batch with the GC paused
    box = redray.get(many_store_refs_in_one.remote(n, 128 * 1024))
    inner = redray.get(box[0])  # a borrowed value: every ref in it is new here
    assert gc.isenabled()
    del box
    sync_driver_refs()  # the listing object is freed by its owner: only our refs remain
    assert [a[0] for a in redray.get(inner, timeout=60)] == [i % 251 for i in range(n)]
    assert store_stats()["num_objects"] == n
    del inner
    wait_empty()


# -- 8. shutdown clean-up --------------------------------------------------------------------
def test_shutdown_removes_spill_files_and_shared_memory():
    shm_before = redray_shm_files()
    proc = run_driver(
        """
        import json, os
        import numpy as np
        import psutil
        import redray
        from redray import api
        from redray.core import context

        ctx = redray.init(num_cpus=1, object_store_memory=200 * 2**20)
        refs = [redray.put(np.full(60 * 2**20, i, dtype=np.uint8)) for i in range(5)]
        huge = redray.put(np.ones(250 * 2**20, dtype=np.uint8))  # larger than the store
        w = context.current
        stats = w.peers.call(w.raylet, "store_stats")
        spill_dir = stats["spill_dir"]
        spill_files = len(os.listdir(spill_dir))

        @redray.remote
        def pids():
            return os.getpid(), os.getppid()

        worker_pid, zygote_pid = redray.get(pids.remote())
        raylet_pid = api._private_node.process.pid
        view = redray.get(refs[0])  # restored from disk
        first = int(view[0])
        del view
        redray.shutdown()

        def maps_store(pid):
            try:
                with open(f"/proc/{pid}/maps") as f:
                    return "redray-store" in f.read()
            except OSError:
                return False

        pids = [raylet_pid, zygote_pid, worker_pid]
        print(json.dumps({
            "session_dir": ctx["session_dir"],
            "spill_dir": spill_dir,
            "spilled": stats["num_spilled"],
            "spill_files": spill_files,
            "fallback_objects": stats["fallback_objects"],
            "first": first,
            "spill_dir_after": os.listdir(spill_dir) if os.path.isdir(spill_dir) else None,
            "session_after": os.path.exists(ctx["session_dir"]),
            "driver_maps_store": maps_store(os.getpid()),
            "alive": [p for p in pids
                      if psutil.pid_exists(p)
                      and psutil.Process(p).status() != psutil.STATUS_ZOMBIE],
        }))
        """,
        timeout=60,
    )
    out = last_json(proc.stdout)
    assert out["spilled"] >= 1 and out["fallback_objects"] == 1, out
    assert out["spill_files"] >= 2, out
    assert out["spill_dir"].startswith(out["session_dir"])
    assert out["first"] == 0
    assert out["spill_dir_after"] in (None, []), out
    assert out["session_after"] is False, out
    assert out["driver_maps_store"] is False, out
    assert out["alive"] == [], out
    assert not os.path.exists(out["session_dir"])
    assert redray_shm_files() - shm_before == set()


# -- the store's usage is visible: `redray status` -------------------------------------------
def test_status_shows_store_used_total_and_spilled(cluster):
    ref = redray.put(np.ones(100 * MiB, dtype=np.uint8))
    worker = context.current

    def reported():
        for info in worker.gcs.nodes():
            if info["node_id"] == worker.node_id:
                return (info.get("load") or {}).get("store_used", 0) >= 100 * MiB
        return False

    wait_for(reported, timeout=10, message="heartbeat never reported the store usage")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "redray.cli", "status", "--address", cluster["address"]],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if worker.node_id[:12] in ln and "used" in ln)
    assert "100.00MiB/500.00MiB used" in line, proc.stdout
    assert "spilled" in line
    del ref
    wait_empty()


# -- 9. pulls between nodes: every reader is answered ----------------------------------------
@pytest.mark.timeout(240)
def test_readers_of_a_pull_are_answered_when_the_owner_dies_mid_transfer():
    """The owner dies while its object is being copied to the readers' node: the region being
    written is not freed under the transfer, and every reader waiting on the pull gets an
    error promptly instead of waiting forever."""
    _shutdown_cluster()
    cluster = LocalCluster()
    try:
        source = cluster.add_node("127.0.0.1", 1, head=True)
        cluster.add_node("127.0.0.2", 2, resources={"readers": 10})
        cluster.wait_nodes(2)
        redray.init(address=cluster.url, _node_ip_address="127.0.0.2")
        on_source = NodeAffinitySchedulingStrategy(node_ids(cluster)["127.0.0.1"], soft=False)
        owner = RemoteOwner.options(resources={"readers": 1}).remote()
        owner_pid = redray.get(owner.pid.remote(), timeout=60)
        box = redray.get(owner.make_on.remote(on_source, 42, 1000 * MiB), timeout=120)
        assert store_stats()["num_objects"] == 0  # it lives on the source node only

        outcomes: list = []

        def read() -> None:
            try:
                outcomes.append(redray.get(box[0], timeout=60).nbytes)
            except Exception as exc:
                outcomes.append(exc)

        readers = [threading.Thread(target=read, daemon=True) for _ in range(2)]
        for reader in readers:
            reader.start()
        # Freeze the serving raylet at a moment the copy is half done on this node.
        source_pid = source.process.pid
        deadline = time.monotonic() + 60
        caught = None
        while caught is None and time.monotonic() < deadline:
            os.kill(source_pid, signal.SIGSTOP)
            stats = store_stats()
            if stats["num_unsealed"] == 1:
                caught = stats
                break
            os.kill(source_pid, signal.SIGCONT)
            assert stats["num_objects"] == 0, "the transfer finished before it was caught"
            time.sleep(0.001)
        assert caught is not None, "the transfer never started"
        try:
            os.kill(owner_pid, signal.SIGKILL)
            # The readers' node frees the dead owner's objects: the one being written is
            # hidden at once, its memory kept for the transfer still writing into it.
            during = wait_store(lambda s: s["num_objects"] == 0, message="owner's object kept")
            assert during["used"] == caught["used"], "the region was freed under its writer"
        finally:
            os.kill(source_pid, signal.SIGCONT)
        for reader in readers:
            reader.join(30)
        assert not any(r.is_alive() for r in readers), "a reader of the pull never got an answer"
        assert len(outcomes) == 2
        assert all(isinstance(o, (OwnerDiedError, ObjectLostError)) for o in outcomes), outcomes
        wait_store(lambda s: s["used"] == 0 and s["num_unsealed"] == 0 and s["num_objects"] == 0)
    finally:
        cluster.shutdown()


# -- 10. heartbeats while the store churns ------------------------------------------------------
def _alloc_many(oids: list[bytes], size: int, owner: bytes) -> None:
    """Reserve store objects the way writers do, many requests in flight at once."""
    worker = context.current
    done = threading.Event()
    left = [len(oids)]

    def answered(reply) -> None:
        assert not isinstance(reply, BaseException), reply
        left[0] -= 1
        if not left[0]:
            done.set()

    for oid in oids:
        worker.peers.call_async(worker.raylet, "alloc", (oid, size, owner), answered)
    assert done.wait(60), "the raylet did not answer the allocations"


@pytest.mark.timeout(180)
def test_node_stays_alive_while_its_store_churns():
    """A node with many objects, created and freed as fast as it can, keeps heartbeating."""
    _shutdown_cluster()
    cluster = LocalCluster(node_timeout=1.5)
    try:
        node = cluster.add_node("127.0.0.1", 1, head=True)
        cluster.wait_nodes(1)
        redray.init(address=cluster.url, _node_ip_address="127.0.0.1")
        worker = context.current
        node_id = worker.node_id
        resident = [b"resident-%d" % i for i in range(100_000)]
        for start in range(0, len(resident), 5000):
            batch = resident[start : start + 5000]
            _alloc_many(batch, 1, b"resident-owner")
            for oid in batch[::2]:
                worker.raylet.send(("seal", oid))
        assert store_stats()["num_objects"] == len(resident)

        def alive() -> bool:
            return any(n["node_id"] == node_id and n["alive"] for n in cluster.gcs.nodes())

        end = time.monotonic() + 5
        churned = 0
        while time.monotonic() < end:
            batch = [b"churn-%d" % (churned + i) for i in range(300)]
            churned += len(batch)
            _alloc_many(batch, 1, b"churn-owner")
            for oid in batch:
                worker.raylet.send(("seal", oid))
            worker.raylet.send(("free", batch))
            assert alive(), f"the node was declared dead after {churned} objects churned"
        assert churned > 10_000
        worker.raylet.send(("free", resident))
        # The beats report the store as the raylet sees it now.
        stats = wait_store(lambda s: s["num_objects"] == 0)

        def reported_used():
            for info in cluster.gcs.nodes():
                if info["node_id"] == node_id:
                    return (info.get("load") or {}).get("store_used") == stats["used"]
            return False

        wait_for(reported_used, timeout=10, message="the heartbeat never reported the store")
        assert "heartbeat failed" not in open(f"{node.session_dir}/logs/raylet.log").read()
    finally:
        cluster.shutdown()
