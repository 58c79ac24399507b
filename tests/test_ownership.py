"""Reference counting across real processes: refs handed back and forth are freed exactly
when the last holder drops them, whatever order the counting messages arrive in.

Measured against the raylet's own store counters (see test_object_store.py); the messages
that must survive reordering are sent over real authenticated connections to the driver's
own listener, as another process would send them.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import _ensure_cluster, block_until, mark, wait_for
from test_object_store import STORE, store_stats, sync_driver_refs, wait_empty, wait_store

import redray
from redray import gcs as gcs_schema
from redray.core import context

MiB = 1 << 20


@pytest.fixture
def cluster():
    ctx = _ensure_cluster(num_cpus=2, object_store_memory=STORE)
    sync_driver_refs()
    wait_empty(timeout=10)
    return ctx


@redray.remote
def echo(x):
    return x


@redray.remote
def nested_echo(box):
    return {"again": [box["refs"][0]]}


@redray.remote
class Keeper:
    """Keeps refs it is given (as a list, so they arrive as refs, not values)."""

    def __init__(self):
        self.kept = []

    def keep(self, refs):
        self.kept.extend(refs)
        return len(self.kept)

    def give_back(self):
        kept, self.kept = self.kept, []
        return kept

    def keep_until(self, refs, started, release):
        self.kept.extend(refs)
        mark(started)
        return block_until(release)

    def drop(self):
        self.kept = []
        return True


def test_a_task_returning_a_ref_its_caller_owns_leaves_nothing_behind(cluster):
    for _ in range(20):
        x = redray.put(np.ones(MiB, dtype=np.uint8))
        [back] = redray.get(echo.remote([x]))
        assert back == x
        del x, back
    wait_empty()


def test_a_ref_returned_inside_a_nested_value_is_freed(cluster):
    for _ in range(5):
        x = redray.put(np.ones(MiB, dtype=np.uint8))
        out = redray.get(nested_echo.remote({"refs": [x]}))
        assert int(redray.get(out["again"][0]).sum()) == MiB
        del x, out
    wait_empty()


def test_an_actor_giving_back_a_ref_its_caller_dropped_keeps_it_alive_until_dropped(cluster):
    keeper = Keeper.remote()
    x = redray.put(np.full(MiB, 7, dtype=np.uint8))
    assert redray.get(keeper.keep.remote([x])) == 1
    del x
    sync_driver_refs()
    assert store_stats()["num_objects"] == 1  # the actor's borrow keeps it
    [back] = redray.get(keeper.give_back.remote())
    # The actor dropped its ref after replying; ours, rebuilt from the reply, must hold it.
    assert int(redray.get(back)[0]) == 7
    assert store_stats()["num_objects"] == 1
    del back
    wait_empty()
    redray.kill(keeper)


def test_concurrent_calls_of_a_threaded_actor_register_their_own_borrows(cluster, gate):
    keeper = Keeper.options(max_concurrency=2).remote()
    first = redray.put(np.full(MiB, 1, dtype=np.uint8))
    second = redray.put(np.full(MiB, 2, dtype=np.uint8))
    slow = keeper.keep_until.remote([first], gate.path("started"), gate.release_file)
    gate.wait_mark("started")
    assert redray.get(keeper.keep.remote([second])) == 2  # ends while the first call runs
    gate.open()
    assert redray.get(slow) is True
    del first, second, slow
    sync_driver_refs()
    assert store_stats()["num_objects"] == 2  # both borrowed by the actor
    assert [int(redray.get(r)[0]) for r in redray.get(keeper.give_back.remote())] == [1, 2]
    wait_empty()
    redray.kill(keeper)


# -- messages in an unhelpful order ----------------------------------------------------------
def own_listener():
    """An authenticated connection to this driver's core worker, as another process has."""
    worker = context.current
    received = []
    conn = worker.reactor.connect(worker.address[:2], lambda c, m: received.append(m))
    return worker, conn


def test_an_unborrow_arriving_before_its_borrow_still_frees_the_object(cluster):
    worker, conn = own_listener()
    borrower = os.urandom(16)
    x = redray.put(np.ones(MiB, dtype=np.uint8))
    oid = x._id
    conn.send(("unborrow", [(oid, 1)], borrower))
    wait_for(lambda: worker.refs.borrowers_of(oid) == {borrower: -1})
    del x
    sync_driver_refs()
    # The borrow that release answers is still on its way: the object must wait for it.
    assert store_stats()["num_objects"] == 1
    conn.send(("borrow", [oid], borrower))
    wait_empty()
    conn.close()


def test_a_borrow_arriving_after_its_borrowers_death_is_ignored(cluster):
    worker, conn = own_listener()
    borrower = os.urandom(16)
    x = redray.put(np.ones(MiB, dtype=np.uint8))
    oid = x._id
    conn.send(("borrow", [oid], borrower))
    wait_for(lambda: worker.refs.borrowers_of(oid) == {borrower: 1})
    worker.gcs.publish(gcs_schema.WORKER_CHANNEL, {"worker_id": borrower.hex(), "node_id": ""})
    wait_for(lambda: worker.refs.borrowers_of(oid) == {})
    conn.send(("borrow", [oid], borrower))  # relayed before the death, delivered after it
    del x
    wait_store(lambda s: s["num_objects"] == 0, message="a dead borrower's borrow kept it")
    assert oid not in worker.refs.objects
    conn.close()
