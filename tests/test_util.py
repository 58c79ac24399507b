"""redray.util.ActorPool and redray.util.queue.Queue on a real cluster (2 CPUs).

Tasks that must stay busy wait on events of the `Signals` actor (an async actor holding one
asyncio.Event per key), so the tests decide when each call finishes instead of sleeping.
"""

from __future__ import annotations

import asyncio
import pickle
import queue as stdlib_queue
import threading
import time

import pytest
from conftest import wait_for

import redray
from redray.exceptions import ActorDiedError, RayActorError, RayTaskError
from redray.util import ActorPool, list_named_actors
from redray.util.queue import Empty, Full, Queue

# A broken pool or queue tends to block forever: fail such a test well before the suite's limit.
pytestmark = [pytest.mark.usefixtures("ray_start"), pytest.mark.timeout(60)]


# -- actors and tasks used below -------------------------------------------------------------
@redray.remote
class Signals:
    """Named events: `wait(key)` returns once someone called `send(key)` (before or after)."""

    def __init__(self):
        self.events = {}

    def _event(self, key):
        if key not in self.events:
            self.events[key] = asyncio.Event()
        return self.events[key]

    async def wait(self, key):
        await self._event(key).wait()

    async def send(self, key):
        self._event(key).set()


def release(signals, *keys):
    redray.get([signals.send.remote(key) for key in keys])


@redray.remote
class Worker:
    def double(self, x):
        return 2 * x

    def gated(self, key, signals):
        """Finish once the key's signal is sent; report when (monotonic clock, system-wide)."""
        redray.get(signals.wait.remote(key))
        return key, time.monotonic()

    def fail(self, x):
        raise ValueError(f"bad value {x}")

    @redray.method(num_returns=2)
    def pair(self, x):
        return x, -x


def double(actor, value):
    return actor.double.remote(value)


def done(ref, timeout=10):
    """Wait (no sleep) until ref is finished; fails the test if it is not within timeout."""
    ready, _ = redray.wait([ref], timeout=timeout)
    assert ready, f"{ref} did not finish within {timeout} s"


@pytest.fixture
def signals():
    handle = Signals.remote()
    yield handle
    redray.kill(handle)


@pytest.fixture
def workers():
    return [Worker.remote() for _ in range(3)]


# -- ActorPool ------------------------------------------------------------------------------
def test_pool_submit_get_next_has_next(workers):
    pool = ActorPool(workers[:2])
    assert not pool.has_next()
    for i in range(5):  # more values than actors: the rest wait for a free actor
        pool.submit(double, i)
    assert pool.has_next()
    assert [pool.get_next() for _ in range(5)] == [0, 2, 4, 6, 8]
    assert not pool.has_next()
    with pytest.raises(StopIteration, match="No more results to get"):
        pool.get_next()
    with pytest.raises(StopIteration, match="No more results to get"):
        pool.get_next_unordered()
    pool.submit(double, 21)
    assert pool.get_next_unordered() == 42


def test_pool_map_is_eager_and_ordered(workers):
    pool = ActorPool(workers)
    calls = []

    def fn(actor, value):
        calls.append(value)
        return actor.double.remote(value)

    results = pool.map(fn, range(3))
    assert calls == [0, 1, 2]  # submitted when map is called, not when iterated
    assert list(results) == [0, 2, 4]
    assert list(pool.map(double, [])) == []


def test_pool_map_preserves_order_with_uneven_durations(workers, signals):
    pool = ActorPool(workers)
    refs = []

    def fn(actor, key):
        refs.append(actor.gated.remote(key, signals))
        return refs[-1]

    results = pool.map(fn, range(6))  # 3 start now, 3 wait for an actor
    assert len(refs) == 3
    for key in (2, 1, 0):  # the first three finish last-to-first
        release(signals, key)
        done(refs[key])
    release(signals, 5, 4, 3)  # the others finish as soon as they start
    out = list(results)
    assert [key for key, _ in out] == [0, 1, 2, 3, 4, 5]
    finished_at = [t for _, t in out]
    assert finished_at[2] < finished_at[1] < finished_at[0]


def test_pool_map_unordered_yields_in_completion_order(workers, signals):
    pool = ActorPool(workers[:2])

    def fn(actor, key):
        return actor.gated.remote(key, signals)

    results = pool.map_unordered(fn, range(4))  # 0 and 1 run, 2 and 3 wait
    order = []
    for key in (1, 2, 0, 3):  # 2 starts when 1 is handed out, 3 when 0 is
        release(signals, key)
        order.append(next(results)[0])
    assert order == [1, 2, 0, 3]
    assert list(results) == []
    assert not pool.has_next()


def test_pool_get_next_unordered_returns_first_finished(workers, signals):
    pool = ActorPool(workers)
    for key in ("slow", "fast"):
        pool.submit(lambda a, k: a.gated.remote(k, signals), key)
    release(signals, "fast")
    assert pool.get_next_unordered(timeout=10)[0] == "fast"
    release(signals, "slow")
    assert pool.get_next_unordered(timeout=10)[0] == "slow"
    assert not pool.has_next()


def test_pool_map_forgets_earlier_submissions(workers, signals):
    pool = ActorPool(workers[:1])
    pool.submit(lambda a, k: a.gated.remote(k, signals), "old")
    results = pool.map(double, [1, 2])  # drops "old"; its actor runs 1 after it
    release(signals, "old")
    assert list(results) == [2, 4]
    pool.submit(double, 5)
    results = pool.map_unordered(double, [3])
    assert list(results) == [6]


def test_pool_get_next_timeout(workers, signals):
    pool = ActorPool(workers[:1])
    pool.submit(lambda a, k: a.gated.remote(k, signals), "a")
    with pytest.raises(TimeoutError, match="Timed out waiting for result"):
        pool.get_next(timeout=0.05)
    assert pool.has_next()  # still pending: a later get_next returns it
    release(signals, "a")
    assert pool.get_next(timeout=10)[0] == "a"

    pool.submit(lambda a, k: a.gated.remote(k, signals), "b")
    with pytest.raises(TimeoutError, match="has been ignored"):
        pool.get_next(timeout=0.05, ignore_if_timedout=True)
    assert not pool.has_next()
    assert pool.has_free()  # the actor is back in the pool
    release(signals, "b")
    pool.submit(double, 4)  # runs after the ignored call on the same actor
    assert pool.get_next() == 8


def test_pool_get_next_unordered_timeout(workers, signals):
    pool = ActorPool(workers[:2])
    for key in ("a", "b"):
        pool.submit(lambda a, k: a.gated.remote(k, signals), key)
    with pytest.raises(TimeoutError, match="Timed out waiting for result"):
        pool.get_next_unordered(timeout=0.05)
    with pytest.raises(TimeoutError, match="has been ignored"):
        pool.get_next_unordered(timeout=0.05, ignore_if_timedout=True)
    assert pool.has_next()  # only one (the oldest) was dropped
    release(signals, "a", "b")
    assert pool.get_next_unordered(timeout=10)[0] == "b"
    assert not pool.has_next()


def test_pool_failing_task(workers):
    pool = ActorPool(workers[:1])
    pool.submit(lambda a, v: a.fail.remote(v), 7)
    pool.submit(double, 3)  # waits for the only actor
    with pytest.raises(ValueError, match="bad value 7") as info:
        pool.get_next()
    assert isinstance(info.value, RayTaskError)
    assert pool.get_next() == 6  # the actor came back and ran the waiting value
    assert pool.has_free()

    results = pool.map(lambda a, v: a.fail.remote(v) if v == 1 else a.double.remote(v), [0, 1])
    assert next(results) == 0
    with pytest.raises(ValueError, match="bad value 1"):
        next(results)
    assert pool.pop_idle() is workers[0]  # back in the pool after the failure


def test_pool_dead_actor_leaves_pool(workers, signals):
    doomed, healthy = workers[:2]
    pool = ActorPool([doomed])
    pool.submit(lambda a, k: a.gated.remote(k, signals), "never")
    redray.kill(doomed)
    with pytest.raises(ActorDiedError):
        pool.get_next(timeout=10)
    assert not pool.has_free()  # the dead actor is not handed work again
    pool.push(healthy)
    pool.submit(double, 1)
    assert pool.get_next() == 2


def test_pool_multiple_returns(workers):
    pool = ActorPool(workers[:2])
    for i in range(3):
        pool.submit(lambda a, v: a.pair.remote(v), i)
    assert pool.get_next(timeout=10) == [0, 0]
    assert sorted(pool.get_next_unordered(timeout=10) for _ in range(2)) == [[1, -1], [2, -2]]


def test_pool_has_free_pop_idle_push(workers):
    a1, a2, a3 = workers
    pool = ActorPool([a1])
    assert pool.has_free()
    pool.submit(double, 1)
    assert not pool.has_free()
    assert pool.pop_idle() is None
    with pytest.raises(ValueError, match="already belongs"):
        pool.push(a1)  # busy member
    pool.push(a2)
    assert pool.has_free()
    with pytest.raises(ValueError, match="already belongs"):
        pool.push(a2)  # idle member
    pool.submit(double, 2)
    pool.submit(double, 3)  # no free actor: waits
    assert not pool.has_free()
    pool.push(a3)  # takes the waiting value at once
    assert not pool.has_free()
    assert [pool.get_next() for _ in range(3)] == [2, 4, 6]
    assert pool.has_free()
    popped = {pool.pop_idle() for _ in range(3)}
    assert popped == {a1, a2, a3}
    assert pool.pop_idle() is None and not pool.has_free()
    pool.submit(double, 4)  # an empty pool keeps the value until an actor is pushed
    assert not pool.has_next()
    pool.push(a1)
    assert pool.get_next() == 8


def test_pool_from_redray_util_namespace():
    import redray.util
    from redray.util.actor_pool import ActorPool as direct

    assert redray.util.ActorPool is direct


# -- Queue ----------------------------------------------------------------------------------
@redray.remote
def produce(q, items, signals=None):
    if signals is not None:
        redray.get(signals.wait.remote("go"))
    for item in items:
        q.put(item)
    return time.monotonic()


@redray.remote
def consume(q, n, signals=None, timeout=20):
    if signals is not None:
        q.qsize()  # this process now knows the queue actor and is connected to it
        redray.get(signals.send.remote("consumer started"))
    items = [q.get(timeout=timeout) for _ in range(n)]
    return items, time.monotonic()


@redray.remote
class Consumer:
    def drain(self, q, n):
        return [q.get(timeout=20) for _ in range(n)]

    async def drain_async(self, q, n):
        return [await q.get_async(timeout=20) for _ in range(n)]


def test_queue_basics():
    q = Queue(maxsize=3)
    assert q.empty() and not q.full()
    assert q.qsize() == q.size() == len(q) == 0
    q.put("a")
    q.put_nowait({"b": [1, 2]})
    q.put("c", block=True, timeout=1)
    assert q.full() and not q.empty()
    assert q.qsize() == q.size() == len(q) == 3
    assert [q.get(), q.get_nowait(), q.get(timeout=1)] == ["a", {"b": [1, 2]}, "c"]
    assert q.empty()

    unbounded = Queue()
    unbounded.put_nowait_batch(range(100))
    assert not unbounded.full() and unbounded.size() == 100
    assert unbounded.get_nowait_batch(100) == list(range(100))


def test_queue_nonblocking_errors():
    q = Queue(maxsize=1)
    with pytest.raises(Empty):
        q.get_nowait()
    with pytest.raises(Empty):
        q.get(block=False)
    q.put(1)
    with pytest.raises(Full):
        q.put_nowait(2)
    with pytest.raises(Full) as info:
        q.put(2, block=False)
    assert isinstance(info.value, stdlib_queue.Full)
    assert issubclass(Empty, stdlib_queue.Empty)
    assert q.get() == 1  # the failed puts added nothing
    assert q.empty()


def test_queue_timeouts():
    q = Queue(maxsize=1)
    start = time.monotonic()
    with pytest.raises(Empty):
        q.get(timeout=0.2)
    assert 0.2 <= time.monotonic() - start < 5
    q.put("x", timeout=0)  # room now: succeeds even with a zero timeout
    start = time.monotonic()
    with pytest.raises(Full):
        q.put("y", timeout=0.2)
    assert 0.2 <= time.monotonic() - start < 5
    assert q.get(timeout=0) == "x"
    with pytest.raises(ValueError, match="non-negative"):
        q.get(timeout=-1)
    with pytest.raises(ValueError, match="non-negative"):
        q.put(1, timeout=-1)


def test_queue_batches():
    q = Queue(maxsize=4)
    q.put_nowait_batch([1, 2, 3])
    with pytest.raises(Full, match="Cannot add 2 items"):
        q.put_nowait_batch([4, 5])  # all or nothing
    assert q.qsize() == 3
    q.put_nowait_batch(x for x in [4])  # any iterable
    assert q.full()
    with pytest.raises(Empty, match="Cannot get 5 items"):
        q.get_nowait_batch(5)  # all or nothing
    assert q.get_nowait_batch(0) == []
    assert q.get_nowait_batch(2) == [1, 2]
    assert q.get_nowait_batch(2) == [3, 4]
    with pytest.raises(TypeError):
        q.put_nowait_batch(5)
    with pytest.raises(TypeError):
        q.get_nowait_batch("2")
    with pytest.raises(ValueError):
        q.get_nowait_batch(-1)


def test_queue_between_producer_and_consumer_tasks():
    q = Queue()
    consumer = consume.remote(q, 10)
    producer = produce.remote(q, list(range(10)))
    items, _ = redray.get(consumer, timeout=20)
    redray.get(producer, timeout=20)
    assert items == list(range(10))
    assert q.empty()


def test_queue_between_producer_task_and_consumer_actor():
    q = Queue()
    consumer = Consumer.remote()
    sync_items = consumer.drain.remote(q, 5)
    async_items = consumer.drain_async.remote(q, 5)
    redray.get(produce.remote(q, list(range(5))), timeout=20)
    assert redray.get(sync_items, timeout=20) == list(range(5))
    redray.get(produce.remote(q, list(range(5, 10))), timeout=20)
    assert redray.get(async_items, timeout=20) == list(range(5, 10))


def test_queue_blocking_get_wakes_on_put_from_another_process(signals):
    q = Queue()
    consumer = consume.remote(q, 1, signals, timeout=30)
    producer = produce.remote(q, ["hello"], signals)
    redray.get(signals.wait.remote("consumer started"), timeout=20)
    release(signals, "go")  # only now does the producer put
    (items, got_at), put_at = redray.get([consumer, producer], timeout=20)
    assert items == ["hello"]
    assert got_at >= put_at - 0.05  # the consumer was still waiting when the item came
    assert got_at - put_at < 5  # ...and woke up at once, not at its 30 s timeout


def test_queue_blocking_put_wakes_on_get_from_another_process():
    q = Queue(maxsize=1)
    q.put("first")
    producer = produce.remote(q, ["second"])  # blocks: the queue is full
    with pytest.raises(redray.exceptions.GetTimeoutError):
        redray.get(producer, timeout=0.2)
    assert q.get() == "first"
    redray.get(producer, timeout=20)  # the put went through once there was room
    assert q.get(timeout=10) == "second"


def test_queue_from_driver_thread_and_async_code():
    q = Queue()

    async def roundtrip():
        await q.put_async(1)
        await q.put_async(2, block=False)
        first = await q.get_async()
        second = await q.get_async(block=False)
        with pytest.raises(Empty):
            await q.get_async(block=False)
        with pytest.raises(Empty):
            await q.get_async(timeout=0.05)
        return first, second

    assert asyncio.run(roundtrip()) == (1, 2)


def test_queue_pickles_with_its_actor():
    q = Queue(maxsize=5)
    copy = pickle.loads(pickle.dumps(q))
    copy.put("via copy")
    assert copy.maxsize == 5
    assert q.get_nowait() == "via copy"


def test_queue_actor_options():
    q = Queue(actor_options={"name": "util-test-queue", "num_cpus": 0})
    q.put("named")
    same = redray.get_actor("util-test-queue")
    assert same == q.actor
    q.shutdown()


def test_queue_shutdown():
    for force in (False, True):  # graceful (__ray_terminate__, then kill if need be) or kill
        name = f"util-test-shutdown-{force}"
        q = Queue(actor_options={"name": name})
        q.put(1)
        actor = q.actor
        q.shutdown(force=force)
        assert q.actor is None
        wait_for(lambda n=name: n not in list_named_actors(), timeout=10)
        with pytest.raises(RayActorError):
            redray.get(actor.qsize.remote(), timeout=10)
        q.shutdown()  # twice is fine


def test_queue_blocked_get_fails_when_queue_dies_while_caller_is_busy(signals):
    """A get waiting in the queue when the queue is shut down fails with RayActorError.

    The busy I/O thread makes the actor's DEAD state arrive before its connection is seen
    closing, a race that also happens under load: in-flight calls must still fail."""
    q = Queue()
    blocked = q.actor.get.remote(None)  # a blocking get, waiting inside the queue actor
    assert q.qsize() == 0  # calls start in order: the get is waiting by now
    # Keep this process's I/O thread busy (as under load) while the queue actor is killed,
    # so the actor's death is published before the closed connection is noticed. The sleep
    # stands for work, not for synchronisation: every step below waits on an event.
    busy = threading.Event()

    def keep_io_thread_busy(_):
        busy.set()
        time.sleep(0.5)

    signals.wait.remote("busy").future().add_done_callback(keep_io_thread_busy)
    signals.send.remote("busy")
    assert busy.wait(10)
    q.shutdown(force=True)
    with pytest.raises(RayActorError):
        redray.get(blocked, timeout=2)


# -- inspect_serializability, get_node_ip_address -----------------------------------------
_UNPICKLABLE_LOCK = threading.Lock()


def _closure_over_a_lock():
    lock = _UNPICKLABLE_LOCK

    def uses_it():  # (defined inside a function: pickled by value, closure and all)
        return lock

    return uses_it


class _HoldsALock:
    def __init__(self):
        self.lock = _UNPICKLABLE_LOCK
        self.number = 1


def test_inspect_serializability_names_the_member_that_does_not_pickle(capsys):
    from redray.util import inspect_serializability

    assert inspect_serializability([1, "two"], name="plain") == (True, set())
    for value in (_closure_over_a_lock(), _HoldsALock()):
        ok, failures = inspect_serializability(value, name="value")
        assert ok is False
        (failure,) = failures
        assert failure.name == "lock"
        assert failure.obj is _UNPICKLABLE_LOCK and failure.parent is value
    assert "FAIL serialization" in capsys.readouterr().out


def test_get_node_ip_address_is_the_nodes():
    from redray.util import get_node_ip_address

    assert get_node_ip_address() == redray.nodes()[0]["NodeManagerAddress"]
