"""Tests for the shared-memory object store: real shared memory, real processes."""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from redray.objstore import (
    Allocator,
    ObjectStore,
    ObjectStoreFullError,
    SharedArena,
    deserialize,
    serialize,
)
from redray.objstore.files import region

REPO = Path(__file__).resolve().parents[1]
KiB, MiB = 1 << 10, 1 << 20
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def spawn(code: str, *args: str) -> subprocess.Popen:
    """Run `code` in a fresh interpreter that can import redray; talk over stdin/stdout."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def ask(proc: subprocess.Popen, line: str | None = None) -> str:
    if line is not None:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
    out = proc.stdout.readline()
    assert out, f"child exited with {proc.wait()}"
    return out.strip()


def put(store: ObjectStore, object_id: bytes, value: object, owner: bytes = b"w") -> int:
    """What a writer does: lay the value out in a fresh region and seal it."""
    ser = serialize(value)
    location = store.create(object_id, ser.total_size, owner)
    ser.write_to(region(store.arena, location, ser.total_size, writable=True))
    store.seal(object_id)
    return location


def read(store: ObjectStore, object_id: bytes) -> object:
    location, size = store.get(object_id)
    view = region(store.arena, location, size, writable=False)
    return deserialize(view, lambda: store.release(object_id))


@pytest.fixture
def store(tmp_path):
    arena = SharedArena.create(1 * MiB)
    s = ObjectStore(arena, spill_dir=str(tmp_path / "spill"))
    yield s
    s.close()
    arena.close()


def blob(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


# -- allocator ---------------------------------------------------------------------------


def test_allocator_best_fit_prefers_smallest_hole_then_lowest_address():
    u = 64
    a = Allocator(100 * u)
    offsets = [a.allocate(n * u) for n in (10, 4, 1, 2, 1, 4, 1)]
    assert offsets == [0, 10 * u, 14 * u, 15 * u, 17 * u, 18 * u, 22 * u]
    for off in (10 * u, 15 * u, 18 * u):  # holes of 4, 2 and 4 units, plus the 77-unit tail
        a.free(off)
    assert a.allocate(2 * u) == 15 * u  # exact fit wins over bigger holes
    assert a.allocate(3 * u) == 10 * u  # two 4-unit holes: the lower one
    assert a.allocate(1 * u) == 13 * u  # the 1-unit remainder it left
    assert a.allocate(4 * u) == 18 * u
    assert a.allocate(1) == 23 * u  # requests round up to the alignment
    assert a.used == 24 * u and a.largest_free() == 76 * u


def test_allocator_coalesces_neighbours_and_reuses_freed_space():
    a = Allocator(1000, alignment=8)
    assert a.capacity == 1000
    x, y, z = a.allocate(300), a.allocate(296), a.allocate(400)  # 300 rounds up to 304
    assert a.allocate(1) is None and a.largest_free() == 0
    a.free(x)
    a.free(z)
    assert a.largest_free() == 400
    a.free(y)  # merges with both neighbours
    assert a.used == 0 and a.largest_free() == 1000
    assert a.allocate(1000) == 0
    a.free(0)
    assert a.allocate(500) == 0  # freed space is reused from the bottom
    with pytest.raises(KeyError):
        a.free(8)


def test_allocator_random_ops_match_brute_force_best_fit():
    rng = random.Random(7)
    a = Allocator(64 * 512)
    live: dict[int, int] = {}
    for _ in range(3000):
        if live and rng.random() < 0.45:
            off = rng.choice(list(live))
            del live[off]
            a.free(off)
            continue
        need = a.round_up(rng.randint(1, 64 * 40))
        holes, pos = [], 0
        for off in sorted(live):
            if off > pos:
                holes.append((off - pos, pos))
            pos = off + live[off]
        if pos < a.capacity:
            holes.append((a.capacity - pos, pos))
        fitting = [h for h in holes if h[0] >= need]
        got = a.allocate(need)
        assert got == (min(fitting)[1] if fitting else None)
        if got is not None:
            live[got] = need
        assert a.used == sum(live.values())
        if got is None:
            assert a.largest_free() == max((h[0] for h in holes), default=0)
    for off in list(live):
        a.free(off)
    assert a.used == 0 and a.largest_free() == a.capacity


# -- layout ----------------------------------------------------------------------------


def test_roundtrip_is_zero_copy_and_read_only(store):
    value = {"a": np.arange(1000.0), "f": np.ones((30, 40), order="F"), "s": "small", "n": 3}
    offset = put(store, b"o1", value)
    back = read(store, b"o1")
    assert back["s"] == "small" and back["n"] == 3
    np.testing.assert_array_equal(back["a"], value["a"])
    np.testing.assert_array_equal(back["f"], value["f"])
    assert back["f"].flags.f_contiguous
    for arr in (back["a"], back["f"]):
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr.flags.writeable = True
        with pytest.raises(ValueError):
            arr[0] = 1
        assert np.shares_memory(arr, np.frombuffer(store.arena.view, np.uint8))
        assert arr.ctypes.data % 64 == 0
    base = np.frombuffer(store.arena.view, np.uint8).ctypes.data
    assert offset <= back["a"].ctypes.data - base < offset + 4096


def test_on_release_fires_once_after_the_last_view_dies():
    arena = SharedArena.create(1 * MiB)
    calls = []
    ser = serialize({"x": np.arange(100), "y": np.arange(50.0)})
    ser.write_to(arena.view[: ser.total_size])
    value = deserialize(arena.view[: ser.total_size], lambda: calls.append(1))
    tail = value["y"][10:]
    del value
    gc.collect()
    assert calls == []  # a slice of one buffer still keeps the region pinned
    view = memoryview(tail)
    del tail
    gc.collect()
    assert calls == []
    view.release()
    del view
    assert calls == [1]

    ser = serialize({"no": "buffers"})
    ser.write_to(arena.view[: ser.total_size])
    assert deserialize(arena.view[: ser.total_size], lambda: calls.append(2)) == {"no": "buffers"}
    assert calls == [1, 2]  # nothing out-of-band: released right after unpickling
    arena.close()


# -- store lifecycle -------------------------------------------------------------------


def test_create_seal_get_release_delete(store):
    ser = serialize(blob(200 * KiB, 1))
    off = store.create(b"a", ser.total_size, b"w1")
    assert not store.contains(b"a") and store.get(b"a") is None
    with pytest.raises(ValueError):
        store.create(b"a", 10, b"w1")
    ser.write_to(store.write_buffer(b"a"))
    store.seal(b"a")
    assert store.contains(b"a")
    assert store.get(b"a") == (off, ser.total_size)
    assert store.get(b"a") == (off, ser.total_size)
    stats = store.stats()
    assert stats["num_pinned"] == 1 and stats["num_objects"] == 1
    assert ser.total_size <= stats["used"] < ser.total_size + 64
    store.release(b"a")
    store.release(b"a")
    with pytest.raises(ValueError):
        store.release(b"a")
    raw = store.read_bytes(b"a")
    assert raw.readonly and bytes(raw[:4]) == b"RRY5" and store.stats()["num_pinned"] == 1
    raw.release()
    store.release(b"a")
    store.delete(b"a")
    store.delete(b"a")  # idempotent
    assert not store.contains(b"a") and store.get(b"a") is None
    assert store.stats()["used"] == 0 and store.stats()["num_objects"] == 0
    assert store.create(b"a", 100, b"w1") == off  # the id and the space can be reused

    store.create(b"b", 1000, b"w1")
    store.abort(b"b")
    store.abort(b"b")
    assert store.stats()["num_objects"] == 1
    store.seal(b"a")
    with pytest.raises(ValueError):
        store.abort(b"a")


def test_delete_while_pinned_frees_at_last_release(store):
    off = put(store, b"p", blob(300 * KiB, 2))
    used = store.stats()["used"]
    store.get(b"p")
    store.get(b"p")
    store.delete(b"p")
    assert not store.contains(b"p") and store.get(b"p") is None
    assert store.stats()["used"] == used and store.stats()["num_objects"] == 0
    assert store.create(b"q", 1000, b"w") != off  # the pinned region is not reused
    store.release(b"p")
    assert store.stats()["used"] == used + 1024  # one pin still held
    store.release(b"p")
    assert store.stats()["used"] == 1024 and store.stats()["num_pinned"] == 0
    with pytest.raises(ValueError):
        store.release(b"p")


def test_delete_owned_by(store):
    put(store, b"a1", b"x" * 1000, owner=b"alice")
    put(store, b"b1", b"y" * 1000, owner=b"bob")
    store.create(b"a2", 500, b"alice")  # unsealed
    put(store, b"a3", b"z" * 1000, owner=b"alice")
    store.get(b"a3")
    assert store.delete_owned_by(b"alice") == [b"a1", b"a2", b"a3"]
    assert store.delete_owned_by(b"alice") == []
    assert store.contains(b"b1") and not store.contains(b"a1") and not store.contains(b"a3")
    assert store.stats()["num_objects"] == 1
    store.release(b"a3")  # the reader's pin outlives the owner
    store.delete(b"b1")
    assert store.stats()["used"] == 512  # unsealed a2: its writer may still be copying
    store.abort(b"a2")  # the writer gives up (or seals): now it is freed
    assert store.stats()["used"] == 0


# -- spilling --------------------------------------------------------------------------


def test_lru_spill_and_restore(store):
    data = {k: blob(300 * KiB, i) for i, k in enumerate([b"A", b"B", b"C", b"D"])}
    for k in (b"A", b"B", b"C"):
        put(store, k, data[k])
    read(store, b"A")  # A becomes most recently used; B is now the oldest
    gc.collect()
    put(store, b"D", data[b"D"])
    stats = store.stats()
    assert stats["spilled_objects"] == 1 and stats["num_spilled"] == 1
    assert stats["used"] <= stats["capacity"]
    spill_dir = Path(stats["spill_dir"])
    assert [p.name for p in spill_dir.iterdir()] == [b"B".hex()]
    assert all(store.contains(k) for k in data)

    back = read(store, b"B")  # restores B, spilling C (now the least recently used)
    np.testing.assert_array_equal(back, data[b"B"])
    stats = store.stats()
    assert stats["restored_objects"] == 1 and stats["spilled_objects"] == 2
    assert sorted(p.name for p in spill_dir.iterdir()) == sorted([b"B".hex(), b"C".hex()])
    del back
    gc.collect()
    for k in (b"C", b"A", b"D", b"B"):
        value = read(store, k)
        np.testing.assert_array_equal(value, data[k])
        del value
    assert store.stats()["num_pinned"] == 0
    store.delete(b"B")
    assert b"B".hex() not in {p.name for p in spill_dir.iterdir()}


def test_objects_the_arena_cannot_hold_are_created_on_disk(store):
    for k in (b"A", b"B", b"C"):
        put(store, k, blob(300 * KiB, 0))
        store.get(k)
    used = store.stats()["used"]
    # Pinned objects leave no room: D gets a file of its own instead of an error.
    value = blob(300 * KiB, 4)
    location = put(store, b"D", value)
    spill_dir = Path(store.stats()["spill_dir"])
    assert location == str(spill_dir / b"D".hex()) and os.path.isfile(location)
    stats = store.stats()
    assert stats["used"] == used and stats["spilled_objects"] == 0  # nothing spilled in vain
    assert stats["fallback_objects"] == 1 and stats["num_spilled"] == 1
    assert stats["disk_bytes"] == os.path.getsize(location)
    np.testing.assert_array_equal(read(store, b"D"), value)
    gc.collect()

    # Larger than the whole store: on disk too.
    huge = blob(store.capacity + 100 * KiB, 5)
    assert put(store, b"huge", huge) == str(spill_dir / b"huge".hex())
    np.testing.assert_array_equal(read(store, b"huge"), huge)
    gc.collect()
    assert store.stats()["num_pinned"] == 3

    store.release(b"B")
    store.create(b"E", 300_000, b"w")  # B spills; unsealed E cannot
    assert store.stats()["spilled_objects"] == 1
    # Restoring B needs room only pinned/unsealed objects hold: it is read from its file.
    location, size = store.get(b"B")
    assert location == str(spill_dir / b"B".hex())
    back = deserialize(region(store.arena, location, size, writable=False))
    np.testing.assert_array_equal(back, blob(300 * KiB, 0))
    assert not back.flags.writeable
    store.abort(b"E")
    assert store.get(b"B") == (location, size)  # pinned: it stays where readers map it
    store.delete(b"B")
    assert os.path.exists(location)  # still pinned twice: readers may still open it
    store.release(b"B")
    store.release(b"B")
    assert not os.path.exists(location)

    for k in (b"D", b"huge"):
        store.delete(k)
    assert sorted(p.name for p in spill_dir.iterdir()) == []
    assert store.stats()["disk_bytes"] == 0 and store.stats()["num_spilled"] == 0


def test_full_error_only_when_the_disk_cannot_take_the_object(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    arena = SharedArena.create(1 * MiB)
    store = ObjectStore(arena, spill_dir=str(blocker / "spill"))
    try:
        with pytest.raises(ObjectStoreFullError) as info:
            store.create(b"huge", 2 * MiB, b"w")
        assert str(2 * MiB) in str(info.value) and "on disk" in str(info.value)
        stats = store.stats()
        assert stats["num_objects"] == 0 and stats["used"] == 0 and stats["disk_bytes"] == 0
        put(store, b"small", b"x" * 1000)  # what fits still works
        assert read(store, b"small") == b"x" * 1000
    finally:
        store.close()
        arena.close()


# -- deleting objects that are still being written ---------------------------------------


def test_unsealed_region_is_not_reused_until_its_writer_seals_or_aborts(store):
    size = 300 * KiB
    writing = store.create(b"w", size, b"owner")
    writer_view = store.write_buffer(b"w")
    store.delete_owned_by(b"owner")  # the owner died while its object was being written
    assert not store.contains(b"w") and store.get(b"w") is None
    assert store.stats()["num_objects"] == 0 and store.stats()["used"] >= size

    other = store.create(b"x", size, b"other")
    assert other + size <= writing or writing + size <= other  # no overlap
    value = blob(size - 1024, 7)
    ser = serialize(value)
    ser.write_to(store.write_buffer(b"x"))
    store.seal(b"x")
    writer_view[:] = b"\xff" * size  # the first writer finishes its copy
    np.testing.assert_array_equal(read(store, b"x"), value)  # not overwritten
    gc.collect()
    del writer_view

    used = store.stats()["used"]
    assert store.seal(b"w") is False  # it was deleted: freed now, never visible
    assert store.stats()["used"] == used - size
    assert not store.contains(b"w")
    with pytest.raises(KeyError):
        store.seal(b"w")

    store.create(b"y", size, b"owner")
    store.delete(b"y")  # e.g. freed by its owner while a peer sends it
    with pytest.raises(ValueError):
        store.create(b"y", size, b"owner")  # its region is still reserved
    store.abort(b"y")
    store.abort(b"y")  # idempotent
    assert store.stats()["used"] == used - size
    store.create(b"y", size, b"owner")  # the id can be used again
    store.abort(b"y")

    # An object on disk (no room in the arena) follows the same rule: its file stays.
    path = store.create(b"big", 2 * MiB, b"owner")
    store.delete(b"big")
    assert os.path.exists(path)
    assert store.seal(b"big") is False and not os.path.exists(path)
    store.delete(b"x")
    stats = store.stats()
    assert stats["used"] == 0 and stats["disk_bytes"] == 0 and stats["num_unsealed"] == 0


def test_counters_match_the_objects_after_random_operations(tmp_path):
    rng = random.Random(3)
    arena = SharedArena.create(2 * MiB)
    store = ObjectStore(arena, spill_dir=str(tmp_path / "spill"))
    unsealed: set[bytes] = set()
    sealed: set[bytes] = set()
    pins: dict[bytes, int] = {}
    for i in range(3000):
        op = rng.random()
        if op < 0.35 or not (unsealed or sealed):
            oid = b"%d" % i
            store.create(oid, rng.choice([100, 50 * KiB, 300 * KiB, 3 * MiB]), b"o%d" % (i % 3))
            unsealed.add(oid)
        elif op < 0.6 and unsealed:
            oid = rng.choice(sorted(unsealed))
            unsealed.discard(oid)
            store.seal(oid)
            sealed.add(oid)
        elif op < 0.7 and unsealed:
            oid = rng.choice(sorted(unsealed))
            unsealed.discard(oid)
            store.abort(oid)
        elif op < 0.8 and sealed:
            oid = rng.choice(sorted(sealed))
            if store.get(oid) is not None:
                pins[oid] = pins.get(oid, 0) + 1
        elif op < 0.9 and pins:
            oid = rng.choice(sorted(pins))
            store.release(oid)
            pins[oid] -= 1
            if not pins[oid]:
                del pins[oid]
        else:
            oid = rng.choice(sorted(sealed | unsealed))
            store.delete(oid)
            sealed.discard(oid)
            if oid in unsealed:  # its writer seals it later: then it is freed
                unsealed.discard(oid)
                assert store.seal(oid) is False
        stats = store.stats()
        assert stats["num_objects"] == len(sealed) + len(unsealed)
        assert stats["num_unsealed"] == len(unsealed)
        assert stats["num_pinned"] == len(pins)
        # What the counters replace: a scan of the object table.
        assert stats["num_spilled"] == sum(e.offset is None for e in store._objects.values())
        assert stats["used"] <= stats["capacity"]
    for oid, count in pins.items():
        for _ in range(count):
            store.release(oid)
    for oid in sealed | unsealed:
        store.delete(oid)
    for oid in unsealed:
        store.abort(oid)
    stats = store.stats()
    assert stats["used"] == 0 and stats["disk_bytes"] == 0 and stats["num_objects"] == 0
    assert list((tmp_path / "spill").iterdir()) == []
    store.close()
    arena.close()


def test_stats_cost_does_not_grow_with_the_number_of_objects(tmp_path):
    def cost(count: int) -> float:
        arena = SharedArena.create(16 * MiB)
        store = ObjectStore(arena, spill_dir=str(tmp_path / f"spill{count}"))
        for i in range(count):
            store.create(b"%d" % i, 1, b"owner")
            if i % 2:
                store.seal(b"%d" % i)
        best = float("inf")
        for _ in range(50):
            start = time.perf_counter()
            store.stats()
            best = min(best, time.perf_counter() - start)
        store.close()
        arena.close()
        return best

    few, many = cost(10), cost(100_000)
    # A heartbeat reads these twice a second; a scan of 100k objects costs milliseconds.
    assert many < 20 * few + 20e-6, (few, many)


def test_close_leaves_spill_dirs_empty(tmp_path):
    arena = SharedArena.create(1 * MiB)
    pre = tmp_path / "pre"
    pre.mkdir()
    (pre / "unrelated").write_text("keep me")
    for spill_dir, created in ((None, True), (str(tmp_path / "new" / "spill"), True), (pre, False)):
        store = ObjectStore(arena, spill_dir=None if spill_dir is None else str(spill_dir))
        for i in range(6):
            put(store, b"%d" % i, blob(300 * KiB, i))
        read(store, b"0")  # restored; its file stays until close
        gc.collect()
        store.delete(b"5")
        used_dir = Path(store.stats()["spill_dir"])
        assert len(list(used_dir.iterdir())) >= 3
        store.close()
        if created:
            assert not used_dir.exists()
        else:
            assert [p.name for p in used_dir.iterdir()] == ["unrelated"]
    arena.close()


def test_churn_of_100mb_objects_stays_within_capacity():
    capacity, size = 256 * MiB, 100_000_000
    arena = SharedArena.create(capacity)
    store = ObjectStore(arena)
    value = np.full(size // 8, 7, dtype=np.int64)
    live: list[bytes] = []
    written = i = 0
    while written < 10 * capacity:
        if len(live) == 2:
            store.delete(live.pop(0))
        oid = b"obj%d" % i
        put(store, oid, value)
        live.append(oid)
        written += size
        i += 1
        assert store.stats()["used"] <= capacity
        # Freed regions are reused, so only about two objects' pages are ever touched.
        assert os.fstat(arena.fd).st_blocks * 512 <= 2 * size + MiB
    assert store.stats()["spilled_objects"] == 0
    assert int(read(store, live[-1]).sum()) == 7 * (size // 8)
    gc.collect()
    store.close()
    arena.close()


# -- multiple processes ----------------------------------------------------------------

WRITER = """
import sys, numpy as np
from redray.objstore import SharedArena, serialize
arena = SharedArena.from_descriptor(tuple(__import__("json").loads(sys.argv[1])))
ser = serialize(np.arange(int(sys.argv[2]), dtype=np.float64))
print(ser.total_size, flush=True)
offset = int(sys.stdin.readline())
arena.prefault(offset, ser.total_size)
ser.write_to(arena.view[offset : offset + ser.total_size])
print("written", flush=True)
sys.stdin.readline()  # keep our mapping alive while the reader runs
"""

READER = """
import gc, json, mmap, sys, numpy as np, psutil
from redray.objstore import SharedArena, deserialize
arena = SharedArena.from_descriptor(tuple(json.loads(sys.argv[1])))
offset, size = int(sys.argv[2]), int(sys.argv[3])
proc = psutil.Process()
uss0 = proc.memory_full_info().uss
released = []
arr = deserialize(arena.view[offset : offset + size], lambda: released.append(1))
total = float(arr.sum())  # touches every page
uss1 = proc.memory_full_info().uss
base = arr
while isinstance(base, np.ndarray):
    base = base.base
start = np.frombuffer(arena.view, np.uint8).ctypes.data
print(json.dumps({
    "growth": uss1 - uss0, "writeable": bool(arr.flags.writeable), "sum": total,
    "base_is_mmap": isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap),
    "position": arr.ctypes.data - start, "released_early": bool(released),
}), flush=True)
del arr
gc.collect()
print(json.dumps({"released": released}), flush=True)
"""


@pytest.mark.timeout(60)
def test_array_written_by_one_process_is_read_zero_copy_by_another():
    n = 25_000_000  # 200 MB of float64
    arena = SharedArena.create(256 * MiB)
    store = ObjectStore(arena)
    desc = json.dumps(arena.descriptor())
    writer = spawn(WRITER, desc, str(n))
    try:
        size = int(ask(writer))
        offset = store.create(b"big", size, b"writer")
        assert ask(writer, str(offset)) == "written"
        store.seal(b"big")
        assert store.get(b"big") == (offset, size)
        reader = spawn(READER, desc, str(offset), str(size))
        report = json.loads(ask(reader))
        assert report["sum"] == n * (n - 1) / 2
        assert report["writeable"] is False and report["base_is_mmap"] is True
        assert offset < report["position"] < offset + 4096  # the array *is* the shared region
        assert report["growth"] < 20 * MiB, report  # not a 200 MB private copy
        assert report["released_early"] is False
        assert json.loads(ask(reader)) == {"released": [1]}
        assert reader.wait(timeout=30) == 0
        store.release(b"big")
    finally:
        writer.kill()
        writer.wait()
    store.close()
    arena.close()


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


OWNER = """
import json, sys, time
from redray.objstore import SharedArena
arena = SharedArena.create(64 << 20)
arena.view[4096:4101] = b"hello"
print(json.dumps(arena.descriptor()), flush=True)
time.sleep(60)
"""


@pytest.mark.timeout(60)
@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="needs memfd_create")
def test_memfd_arena_leaves_nothing_behind_when_owner_is_killed():
    before = shm_entries()
    owner = spawn(OWNER)
    try:
        desc = tuple(json.loads(ask(owner)))
        assert desc[0] == "memfd" and desc[1] == owner.pid
        assert shm_entries() == before
        arena = SharedArena.from_descriptor(desc)
        assert arena.path is None and bytes(arena.view[4096:4101]) == b"hello"
        arena.view[0:3] = b"abc"
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert owner.returncode == -signal.SIGKILL
    assert shm_entries() == before
    assert bytes(arena.view[0:3]) == b"abc"  # our mapping keeps the memory until we close
    arena.close()
    assert shm_entries() == before


ATTACHER = """
import json, sys
from redray.objstore import SharedArena
arena = SharedArena.from_descriptor(tuple(json.loads(sys.argv[1])))
arena.view[100:105] = b"child"
arena.close()
print("ok", flush=True)
"""


@pytest.mark.timeout(60)
def test_path_fallback_is_shared_and_removed_by_close(tmp_path):
    before = shm_entries()
    arena = SharedArena.create(4 * MiB, memfd=False)
    assert arena.path is not None and os.path.exists(arena.path)
    desc = arena.descriptor()
    assert desc == ("path", arena.path, 4 * MiB)
    child = spawn(ATTACHER, json.dumps(desc))
    assert ask(child) == "ok" and child.wait(timeout=30) == 0
    assert bytes(arena.view[100:105]) == b"child"

    store = ObjectStore(arena, 1 * MiB, spill_dir=str(tmp_path / "spill"))
    for i in range(5):
        put(store, b"%d" % i, blob(300 * KiB, i))
    assert store.stats()["spilled_objects"] >= 2
    kept = read(store, b"4")  # a live view must not stop close() from cleaning up
    store.close()
    arena.close()
    assert not (tmp_path / "spill").exists()
    assert not os.path.exists(arena.path)
    assert shm_entries() == before
    assert kept[0] == blob(300 * KiB, 4)[0]
