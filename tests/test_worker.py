"""The core worker's life cycle: losing the local raylet, and what a driver's calls do then.

Each test runs a driver with a private cluster in its own process (`run_driver`) and kills a
part of that cluster with SIGKILL.
"""

from __future__ import annotations

import pytest
from conftest import last_json, run_driver

RAYLET_DIES = """
import json, os, signal, threading, time
import psutil
import redray
from redray.exceptions import LocalRayletDiedError, RaySystemError

redray.init(num_cpus=2)

@redray.remote
def echo(x):
    return x

@redray.remote
def sleepy():
    time.sleep(60)

@redray.remote
class Counter:
    def __init__(self):
        self.n = 0
    def incr(self):
        self.n += 1
        return self.n

counter = Counter.remote()
assert redray.get(counter.incr.remote(), timeout=30) == 1
assert redray.get(echo.remote(1), timeout=30) == 1
pending = sleepy.remote()
blocked = {}

def blocked_get():
    start = time.monotonic()
    try:
        redray.get(pending, timeout=60)
        blocked["outcome"] = "a value"
    except Exception as exc:
        blocked["outcome"] = type(exc).__name__
    blocked["seconds"] = time.monotonic() - start

getter = threading.Thread(target=blocked_get)
getter.start()

me = psutil.Process()
raylet = next(p for p in me.children() if "redray.raylet" in p.cmdline())
raylet.send_signal(signal.SIGKILL)
raylet.wait(10)
killed = time.monotonic()
getter.join(20)
blocked["after_kill"] = time.monotonic() - killed

def attempt(fn):
    start = time.monotonic()
    try:
        fn()
        return "no error"
    except LocalRayletDiedError as exc:
        assert isinstance(exc, redray.exceptions.RayError)
        return round(time.monotonic() - start, 3)
    except BaseException as exc:
        return repr(exc)

calls = {
    "task": attempt(lambda: redray.get(echo.remote(2), timeout=10)),
    "get_pending": attempt(lambda: redray.get(pending, timeout=10)),
    "put_small": attempt(lambda: redray.put(b"x" * 10)),
    "put_large": attempt(lambda: redray.put(b"x" * (1 << 20))),
    "actor_call": attempt(lambda: redray.get(counter.incr.remote(), timeout=10)),
    "actor_creation": attempt(lambda: redray.get(Counter.remote().incr.remote(), timeout=10)),
    "wait": attempt(lambda: redray.wait([pending], timeout=10)),
    "get_actor": attempt(lambda: redray.get_actor("nobody")),
    "nodes": attempt(lambda: redray.nodes()),
    "cluster_resources": attempt(lambda: redray.cluster_resources()),
}
before = me.cpu_times()
time.sleep(1.0)
after = me.cpu_times()
cpu = (after.user + after.system) - (before.user + before.system)
start = time.monotonic()
redray.shutdown()
print(json.dumps({"blocked": blocked, "calls": calls, "cpu": cpu,
                  "shutdown": time.monotonic() - start}))
"""


@pytest.mark.timeout(120)
def test_every_call_raises_local_raylet_died_once_the_raylet_is_gone():
    """SIGKILL the driver's raylet: a get blocked meanwhile, task submission, get, put (small
    and large), actor calls and actor creation raise LocalRayletDiedError within seconds,
    the driver stays idle (no busy loop), and shutdown still works."""
    out = last_json(run_driver(RAYLET_DIES, timeout=100).stdout)
    assert out["blocked"]["outcome"] == "LocalRayletDiedError", out
    assert out["blocked"]["after_kill"] < 10, out
    for name, seconds in out["calls"].items():
        assert isinstance(seconds, float), (name, seconds)
        assert seconds < 5, (name, seconds)
    assert out["cpu"] < 0.3, out  # seconds of CPU over one second of idling
    assert out["shutdown"] < 10, out
