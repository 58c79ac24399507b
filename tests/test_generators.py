"""Generator tasks and actor methods on a real cluster: items stream to the caller as they
are yielded, with backpressure, errors at their position, cancellation, retries after a
SIGKILL, `num_returns="dynamic"`, and what the caller owns is freed once dropped."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal

import numpy as np
import pytest
from conftest import block_until, count_lines, mark, wait_for

import redray
from redray.core import context
from redray.exceptions import RayTaskError, TaskCancelledError

pytestmark = pytest.mark.timeout(60)

BIG = 200 * 1024  # above the inline limit: each item goes through the shared-memory store


# -- remote functions and actors used below ----------------------------------------------------
@redray.remote
def count_to(n, fail_at=None):
    for i in range(n):
        if i == fail_at:
            raise ValueError(f"failed at {i}")
        yield i


@redray.remote
def big_items(n):
    for i in range(n):
        yield np.full(BIG, i % 251, dtype=np.uint8)


@redray.remote
def first_then_gate(release_file):
    yield "first"
    block_until(release_file)
    yield "second"


@redray.remote
def forever(marks_dir):
    i = 0
    while True:
        mark(os.path.join(marks_dir, "last"), str(i))
        yield i
        i += 1


@redray.remote(max_retries=2)
def killed_midway(n, attempts_file, pid_file, release_file):
    with open(attempts_file, "a") as f:
        f.write(f"{os.getpid()}\n")
    first_attempt = count_lines(attempts_file) == 1
    for i in range(n):
        if first_attempt and i == n // 2:
            mark(pid_file, str(os.getpid()))
            block_until(release_file)  # the test kills this process here
        yield i * 10


@redray.remote
class Streamer:
    def items(self, n):
        for i in range(n):
            yield f"sync-{i}"

    def failing(self, n):
        yield from range(n)
        raise KeyError("no more")


@redray.remote
class AsyncStreamer:
    async def items(self, n):
        for i in range(n):
            await asyncio.sleep(0)
            yield f"async-{i}"

    async def failing(self, n):
        for i in range(n):
            yield i
        raise KeyError("no more")

    async def total_of(self, n):
        """Reads a task's stream with `async for` inside the actor's event loop."""
        total = 0
        async for ref in count_to.remote(n):
            total += await ref
        return total


def items_alive(task_id: bytes) -> int:
    """How many of one generator task's items this process still tracks."""
    objects = context.current.refs.objects
    return sum(1 for oid in list(objects) if oid[:14] == task_id and len(oid) > 16)


def store_stats() -> dict:
    worker = context.current
    return worker.peers.call(worker.raylet, "store_stats", timeout=10)


# -- streaming ----------------------------------------------------------------------------------
def test_ten_thousand_items_stream_with_backpressure_and_are_all_freed(ray_start):
    window = 50
    stored = store_stats()["num_objects"]
    gen = count_to.options(_generator_backpressure_num_objects=window).remote(10_000)
    task_id = gen.completed().task_id()
    total = redray.get(next(gen))
    # While nobody reads, the generator runs ahead by its window, and no further.
    wait_for(lambda: items_alive(task_id) >= window, message="the generator did not run ahead")
    most_alive = 0
    for i, ref in enumerate(gen):
        total += redray.get(ref)
        del ref
        if i % 500 == 0:
            most_alive = max(most_alive, items_alive(task_id))
    assert total == sum(range(10_000))
    assert most_alive <= window + 1
    del gen
    wait_for(lambda: items_alive(task_id) == 0, message="items still tracked after reading")
    assert store_stats()["num_objects"] == stored


def test_large_items_go_through_the_store_bounded_and_are_freed(ray_start):
    base = store_stats()["num_objects"]
    gen = big_items.options(_generator_backpressure_num_objects=3).remote(30)
    most = 0
    for i, ref in enumerate(gen):
        value = redray.get(ref)
        assert value.shape == (BIG,) and int(value[0]) == i % 251
        del value, ref
        if i == 0:  # the generator fills its window while we do not read
            wait_for(lambda: store_stats()["num_objects"] - base >= 3)
        most = max(most, store_stats()["num_objects"] - base)
    assert most <= 5
    del gen
    wait_for(lambda: store_stats()["num_objects"] == base, message="items left in the store")


def test_first_item_is_readable_before_the_generator_finishes(ray_start, gate):
    gen = first_then_gate.remote(gate.release_file)
    assert redray.get(next(gen), timeout=20) == "first"  # the task is still blocked
    assert not redray.wait([gen.completed()], timeout=0)[0]
    gate.open()
    assert [redray.get(ref) for ref in gen] == ["second"]
    assert redray.get(gen.completed()) is None
    assert gen.is_finished()


def test_an_error_surfaces_at_its_position_after_the_earlier_items(ray_start):
    gen = count_to.remote(10, fail_at=4)
    refs = [next(gen) for _ in range(5)]
    assert redray.get(refs[:4]) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="failed at 4") as info:
        redray.get(refs[4])
    assert isinstance(info.value, RayTaskError)
    with pytest.raises(StopIteration):
        next(gen)
    assert redray.get(refs[:4]) == [0, 1, 2, 3]  # earlier items are still readable


def test_cancel_stops_a_generator_midway(ray_start, tmp_path):
    gen = forever.options(_generator_backpressure_num_objects=2).remote(str(tmp_path))
    assert [redray.get(next(gen)) for _ in range(3)] == [0, 1, 2]
    redray.cancel(gen)
    values, errors = [], []
    for ref in gen:  # ends: the generator was stopped (it would yield forever)
        try:
            values.append(redray.get(ref))
        except TaskCancelledError as exc:
            errors.append(exc)
    assert len(errors) == 1 and values == list(range(3, 3 + len(values)))
    last = int((tmp_path / "last").read_text())
    assert last <= 3 + len(values) + 2  # it went no further than its window


def test_a_generator_whose_worker_is_killed_is_rerun_and_each_item_read_once(ray_start, gate):
    attempts = gate.path("attempts")
    gen = killed_midway.remote(10, attempts, gate.path("pid"), gate.release_file)
    first = [redray.get(next(gen)) for _ in range(3)]
    pid = int(gate.wait_mark("pid"))  # five items sent, the worker blocked
    os.kill(pid, signal.SIGKILL)
    gate.open()
    rest = [redray.get(ref) for ref in gen]
    assert first + rest == [i * 10 for i in range(10)]
    assert count_lines(attempts) == 2
    assert redray.get(gen.completed()) is None


def test_get_of_generator_items_and_wait_on_a_generator(ray_start, gate):
    gen = first_then_gate.remote(gate.release_file)
    assert redray.get(gen) is gen  # as Ray: get() hands a generator back
    ready, not_ready = redray.wait([gen], timeout=20)
    assert ready == [gen] and not_ready == []
    gate.open()
    assert redray.get(list(gen)) == ["first", "second"]
    assert redray.get(list(count_to.remote(5))) == [0, 1, 2, 3, 4]


def test_generators_cannot_be_passed_to_tasks(ray_start):
    gen = count_to.remote(1)
    with pytest.raises(TypeError, match="ObjectRefGenerator is not allowed"):
        pickle.dumps(gen)


def test_async_for_in_an_asyncio_driver(ray_start):
    async def read():
        return [await ref async for ref in count_to.remote(20)]

    assert asyncio.run(read()) == list(range(20))


# -- actors ---------------------------------------------------------------------------------------
def test_sync_and_async_actor_generator_methods(ray_start):
    sync, aio = Streamer.remote(), AsyncStreamer.remote()
    assert type(sync.items.remote(1)) is redray.ObjectRefGenerator
    assert [redray.get(r) for r in sync.items.remote(3)] == ["sync-0", "sync-1", "sync-2"]
    assert [redray.get(r) for r in aio.items.remote(3)] == ["async-0", "async-1", "async-2"]
    for handle in (sync, aio):
        refs = list(handle.failing.remote(2))
        assert redray.get(refs[:2]) == [0, 1] and len(refs) == 3
        with pytest.raises(KeyError):
            redray.get(refs[2])
    bounded = aio.items.options(_generator_backpressure_num_objects=2).remote(200)
    assert len([redray.get(r) for r in bounded]) == 200
    assert redray.get(aio.total_of.remote(100)) == sum(range(100))


@redray.remote(max_restarts=1, max_task_retries=1)
class Restartable:
    def items(self, n, pid_file, release_file):
        for i in range(n):
            if i == n // 2 and not redray.get_runtime_context().was_current_actor_reconstructed:
                mark(pid_file, str(os.getpid()))
                block_until(release_file)  # the test kills this process here
            yield i


def test_an_actor_generator_whose_process_is_killed_is_rerun_and_read_once(ray_start, gate):
    actor = Restartable.remote()
    gen = actor.items.remote(8, gate.path("pid"), gate.release_file)
    first = [redray.get(next(gen)) for _ in range(2)]
    os.kill(int(gate.wait_mark("pid")), signal.SIGKILL)
    gate.open()
    assert first + [redray.get(ref) for ref in gen] == list(range(8))


# -- num_returns="dynamic" and integer num_returns --------------------------------------------
def test_dynamic_returns_a_ref_to_the_generated_refs(ray_start):
    ref = count_to.options(num_returns="dynamic").remote(4)
    assert type(ref) is redray.ObjectRef
    items = redray.get(ref)
    assert type(items) is redray.DynamicObjectRefGenerator and len(items) == 4
    assert redray.get(list(items)) == [0, 1, 2, 3]
    failed = list(redray.get(count_to.options(num_returns="dynamic").remote(5, fail_at=2)))
    assert redray.get(failed[:2]) == [0, 1] and len(failed) == 3
    with pytest.raises(ValueError, match="failed at 2"):
        redray.get(failed[2])


def test_integer_num_returns_takes_a_generators_items_as_returns(ray_start):
    first, second = count_to.options(num_returns=2).remote(2)
    assert redray.get([first, second]) == [0, 1]
    with pytest.raises(ValueError, match="yielded 3 objects, but num_returns=2"):
        redray.get(count_to.options(num_returns=2).remote(3)[0])


@redray.remote
def echo(x):
    return x


def test_dropping_an_unread_generator_frees_its_worker(ray_start):
    for _ in range(2):  # one per CPU: both workers paused by backpressure
        gen = count_to.options(_generator_backpressure_num_objects=2).remote(1_000)
        assert redray.get(next(gen)) == 0
        task_id = gen.completed().task_id()
        del gen
    assert redray.get(echo.remote("ran"), timeout=30) == "ran"
    wait_for(lambda: items_alive(task_id) == 0, message="items of a dropped stream still tracked")


def test_streaming_or_dynamic_on_a_plain_function_is_refused_where_written(ray_start):
    def plain():
        return 1

    for value in ("streaming", "dynamic"):
        with pytest.raises(ValueError, match="can only be used with generator functions"):
            redray.remote(num_returns=value)(plain)
        with pytest.raises(ValueError, match="can only be used with generator functions"):
            redray.remote(plain).options(num_returns=value)
