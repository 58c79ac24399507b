"""Polling before sleeping (redray/spinning.py): only after short waits, never when idle."""

from __future__ import annotations

import os
import time

import psutil
import pytest

import redray
from redray.transport import spinning
from redray.transport.spinning import SpinPolicy


def test_long_waits_turn_polling_off():
    policy = SpinPolicy()
    for _ in range(20):
        policy.waited(0.05)
    assert policy.typical_wait > spinning.SPIN_SECONDS
    assert policy.budget() == 0.0


def test_the_typical_wait_follows_recent_waits():
    policy = SpinPolicy()
    for _ in range(20):
        policy.waited(0.05)
    for _ in range(60):
        policy.waited(0.00005)
    assert policy.typical_wait < spinning.SPIN_SECONDS
    assert policy.budget() in (0.0, spinning.SPIN_SECONDS)  # 0 only if no CPU is free


def test_runnable_threads_are_read_from_the_system():
    if not os.path.exists("/proc/loadavg"):
        pytest.skip("Linux only")
    assert 1 <= SpinPolicy()._runnable() < 100_000


@redray.remote
def pid():
    return os.getpid()


@pytest.mark.timeout(60)
def test_no_process_keeps_polling_once_calls_stop(ray_start):
    """After a burst of synchronous calls (which poll), an idle driver and worker use no CPU."""
    worker = psutil.Process(redray.get(pid.remote()))
    for _ in range(500):
        redray.get(pid.remote())
    me = psutil.Process()
    before = me.cpu_times(), worker.cpu_times()
    time.sleep(1.0)  # the measurement window, not a synchronisation
    after = me.cpu_times(), worker.cpu_times()
    used = [sum(a[:2]) - sum(b[:2]) for a, b in zip(after, before, strict=True)]
    assert used[0] < 0.1, f"the driver used {used[0]:.3f} s of CPU while idle"
    assert used[1] < 0.1, f"the worker used {used[1]:.3f} s of CPU while idle"
