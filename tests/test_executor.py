"""Running tasks and actor calls in worker processes: what a caller sees when user code
raises KeyboardInterrupt itself (not a cancellation), and that the worker stays usable."""

from __future__ import annotations

import os

import pytest

import redray
from redray.exceptions import RayTaskError, TaskCancelledError


@redray.remote(max_retries=0)
def raises_keyboard_interrupt():
    raise KeyboardInterrupt


@redray.remote
def pid_of_worker():
    return os.getpid()


@redray.remote
class Interrupting:
    def interrupt(self):
        raise KeyboardInterrupt

    def ping(self):
        return "pong"


@pytest.mark.timeout(60)
def test_task_raising_keyboard_interrupt_fails_as_cancelled_and_frees_its_cpu(ray_start):
    """As in Ray: get raises RayTaskError(TaskCancelledError) with the user's frames; the
    worker replies, so its CPU comes back (two such tasks on two CPUs block nothing)."""
    refs = [raises_keyboard_interrupt.remote() for _ in range(2)]
    for ref in refs:
        with pytest.raises(TaskCancelledError) as info:
            redray.get(ref, timeout=20)
        assert isinstance(info.value, RayTaskError)
        assert "raise KeyboardInterrupt" in str(info.value)
        assert "TaskCancelledError" in str(info.value)
    assert len(redray.get([pid_of_worker.remote() for _ in range(4)], timeout=20)) == 4


@pytest.mark.timeout(60)
@pytest.mark.parametrize("max_concurrency", [1, 2])
def test_actor_method_raising_keyboard_interrupt_replies_and_the_actor_goes_on(
    ray_start, max_concurrency
):
    actor = Interrupting.options(max_concurrency=max_concurrency).remote()
    for _ in range(3):
        with pytest.raises(TaskCancelledError) as info:
            redray.get(actor.interrupt.remote(), timeout=20)
        assert isinstance(info.value, RayTaskError)
    assert redray.get(actor.ping.remote(), timeout=20) == "pong"
    redray.kill(actor)


@redray.remote
class AsyncInterrupting:
    async def interrupt(self):
        raise KeyboardInterrupt

    async def ping(self):
        return "pong"


@pytest.mark.timeout(60)
def test_async_actor_method_raising_keyboard_interrupt_replies_and_the_loop_goes_on(ray_start):
    actor = AsyncInterrupting.remote()
    for _ in range(3):
        with pytest.raises(TaskCancelledError) as info:
            redray.get(actor.interrupt.remote(), timeout=20)
        assert isinstance(info.value, RayTaskError)
    assert redray.get(actor.ping.remote(), timeout=20) == "pong"
    redray.kill(actor)
