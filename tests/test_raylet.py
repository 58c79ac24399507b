"""The raylet's worker pool on a real node: which worker runs what, and how many processes
it starts."""

from __future__ import annotations

import os
import threading
import time

import psutil
import pytest

import redray
from redray.core import context


@redray.remote
def worker_pid():
    return os.getpid()


@redray.remote
def short_task(i):
    time.sleep(0.005)  # the work itself: keeps workers busy so the owner asks for more leases
    return os.getpid()


@redray.remote
class Pinger:
    def pid(self):
        return os.getpid()


def node_processes() -> set[int]:
    """Every process under the raylet of this driver's node (fork server and workers)."""
    worker = context.current
    raylet_pid = next(n["pid"] for n in worker.gcs.nodes() if n["node_id"] == worker.node_id)
    return {p.pid for p in psutil.Process(raylet_pid).children(recursive=True)}


@pytest.mark.timeout(60)
def test_gpu_and_cpu_only_work_never_share_a_worker(ray_start_gpu_custom):
    """As in Ray: a worker that ran GPU work never runs CPU-only work, nor the reverse."""
    gpu = redray.get([worker_pid.options(num_gpus=1).remote() for _ in range(6)], timeout=30)
    cpu = redray.get([worker_pid.remote() for _ in range(6)], timeout=30)
    gpu += redray.get([worker_pid.options(num_gpus=1).remote() for _ in range(6)], timeout=30)
    cpu += redray.get([worker_pid.remote() for _ in range(6)], timeout=30)
    assert not set(gpu) & set(cpu)


@pytest.mark.timeout(90)
def test_after_actors_the_task_pool_stays_near_the_cpu_count(ray_start):
    """Actors take workers out of the pool; the tasks that follow start only as many new
    workers as the free CPUs can run, not one per lease request."""
    actors = [Pinger.remote() for _ in range(3)]
    actor_pids = set(redray.get([a.pid.remote() for a in actors], timeout=30))
    before = node_processes()
    pids = redray.get([short_task.remote(i) for i in range(200)], timeout=60)
    started = node_processes() - before
    assert not set(pids) & actor_pids
    assert len(set(pids)) <= 2 + 1, set(pids)  # num_cpus, plus one of slack
    assert len(started) <= 2 + 1, started
    for actor in actors:
        redray.kill(actor)


def test_a_reader_of_an_object_still_being_written_waits_for_its_seal(ray_start):
    """A task's reply can reach its owner before the worker's seal reaches the raylet (two
    connections): the owner's read must wait for the seal, not find the object lost."""
    worker = context.current
    peers, raylet = worker.peers, worker.raylet
    oid = os.urandom(16)
    where = peers.call(raylet, "alloc", oid, 4096, worker.worker_id, timeout=10)
    assert not isinstance(where, BaseException)
    replies: list = []
    answered = threading.Event()

    def on_reply(reply):
        replies.append(reply)
        answered.set()

    peers.call_async(raylet, "pin", (oid, worker.node_id, worker.worker_id), on_reply)
    assert not answered.wait(0.3)  # (an unsealed object: no answer yet)
    raylet.send(("seal", oid))
    assert answered.wait(10)
    assert not isinstance(replies[0], BaseException), replies[0]
    location, size, copied = replies[0]
    assert size == 4096 and not copied
    raylet.send(("unpin", oid))
    raylet.send(("free", [oid]))
