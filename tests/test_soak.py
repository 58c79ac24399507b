"""Soak: long runs of the usual patterns leave nothing behind.

A driver in its own process runs each pattern many times and reports its own threads, file
descriptors and RSS, the node's processes, and the store's bytes before and after; every
figure must come back to its baseline (RSS within a margin: the allocator keeps some pages;
file descriptors within two: Redis connections are pooled).
The figures are printed, so a run shows how close to the baseline each one came.

Marked `slow`; the CI command runs it with the rest.
"""

from __future__ import annotations

import json

import pytest
from conftest import last_json, run_driver

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MEASURE = """
import gc, json, os, threading, time
import psutil
import redray
from redray.core import context

def store():
    worker = context.current
    return worker.peers.call(worker.raylet, "store_stats", timeout=10)

def cluster_processes():
    raylets = [p for p in psutil.Process().children() if "redray.raylet" in " ".join(p.cmdline())]
    procs = []
    for raylet in raylets:
        procs.append(raylet)
        procs.extend(raylet.children(recursive=True))
    return procs

def figures():
    gc.collect()
    context.current.ownership.process_released()
    me = psutil.Process()
    rss = []
    for proc in cluster_processes():
        try:
            rss.append(proc.memory_info().rss)
        except psutil.NoSuchProcess:
            pass  # (an idle worker ending as we look)
    stats = store()
    return {
        "threads": threading.active_count(),
        "fds": me.num_fds(),
        "rss_mb": me.memory_info().rss / 2**20,
        "node_processes": len(rss),
        "node_rss_mb": sum(rss) / 2**20,
        "store_used": stats["used"],
        "store_objects": stats["num_objects"],
        "disk_bytes": stats["disk_bytes"],
    }

def settle(baseline, keys=("threads", "fds", "store_used", "store_objects", "disk_bytes")):
    deadline = time.monotonic() + 20
    while True:
        now = figures()
        if all(now[k] <= baseline[k] for k in keys) or time.monotonic() > deadline:
            return now
        time.sleep(0.1)
"""


def soak(body: str, timeout: float = 500, env: dict[str, str] | None = None) -> dict:
    """Run body (with `redray` initialized and `baseline` measured) in a fresh driver."""
    script = (
        MEASURE
        + """
redray.init(num_cpus=2, object_store_memory=300 * 2**20)
@redray.remote
def warm(x=None):
    return x
# What the runtime starts once and keeps (the thread following process deaths, connections
# to the raylet and Redis) is in the baseline: warm each path up once.
redray.get([warm.remote() for _ in range(100)])
redray.get(warm.remote([redray.put(b"x" * 200_000)]))
baseline = figures()
"""
        + body
        + """
after = settle(baseline)
print(json.dumps({"baseline": baseline, "after": after, **globals().get("extra", {})}))
redray.shutdown()
"""
    )
    out = last_json(run_driver(script, timeout=timeout, env=env).stdout)
    print(json.dumps(out, indent=1))
    return out


def assert_back_to_baseline(figures: dict, rss_margin_mb: float = 60) -> None:
    before, after = figures["baseline"], figures["after"]
    for key in ("threads", "node_processes", "store_used", "store_objects", "disk_bytes"):
        assert after[key] <= before[key], f"{key}: {before[key]} -> {after[key]}"
    # A pooled connection to Redis more (two threads once used it at the same time) is not a
    # leak; one per task, put or actor would be thousands.
    assert after["fds"] <= before["fds"] + 2, f"fds: {before['fds']} -> {after['fds']}"
    assert after["rss_mb"] <= before["rss_mb"] + rss_margin_mb
    assert after["node_rss_mb"] <= before["node_rss_mb"] + 2 * rss_margin_mb


def test_100k_tasks():
    figures = soak(
        """
@redray.remote
def small(i):
    return i
for start in range(0, 100_000, 10_000):
    assert redray.get([small.remote(i) for i in range(start, start + 10_000)])[-1] == start + 9_999
"""
    )
    assert_back_to_baseline(figures)


def test_20k_dropped_1mb_puts_and_echo_rounds():
    figures = soak(
        """
import numpy as np
block = np.ones(2**20, dtype=np.uint8)
for _ in range(20_000):
    ref = redray.put(block)
    del ref
@redray.remote
def echo(x):
    return x
for _ in range(20):
    x = redray.put(block)
    [back] = redray.get(echo.remote([x]))
    assert back == x
    del x, back
"""
    )
    assert_back_to_baseline(figures)


def test_1000_actors_and_groups_created_and_removed_leave_redis_as_it_was():
    """Besides the processes' figures, the cluster's Redis: its key count (less the task
    history, which the task-event caps bound) returns to the baseline, and the tables of dead actors and removed groups stay within their caps
    (lowered here to 50, Ray's default for actors being 100,000)."""
    figures = soak(
        """
from redray import gcs as schema
from redray.util.placement_group import placement_group, remove_placement_group

@redray.remote(num_cpus=0)
class Counter:
    def __init__(self):
        self.n = 0
    def incr(self):
        self.n += 1
        return self.n

def redis_figures():
    gcs = context.current.gcs
    # Task history (kept on purpose, capped) and the node's machine stats (one per node).
    history = (gcs.key("te:"), gcs.key("metrics:"), gcs.key("hb_host:"))
    keys = [k for k in gcs.redis.scan_iter(count=1000) if not k.decode().startswith(history)]
    return {
        "keys": len(keys),
        "names": sorted(k.decode() for k in keys),
        "actors": gcs.redis.hlen(gcs.key(schema.ACTORS)),
        "actor_specs": gcs.redis.hlen(gcs.key(schema.ACTOR_SPECS)),
        "groups": gcs.redis.hlen(gcs.key(schema.PLACEMENT_GROUPS)),
    }

def removed(group):
    info = context.current.gcs.placement_group(group.id.hex())
    return info is None or info["state"] == "REMOVED"

def dead(handle):
    info = context.current.gcs.actor(handle._actor_id.hex())
    return info is None or info["state"] == "DEAD"

warm = Counter.remote()
redray.get(warm.incr.remote())
redray.kill(warm)
pg = placement_group([{"CPU": 0.01}])
assert pg.wait(10)
remove_placement_group(pg)
deadline = time.monotonic() + 30
while not (dead(warm) and removed(pg)) and time.monotonic() < deadline:
    time.sleep(0.05)
redis_before = redis_figures()
for start in range(0, 1000, 50):
    actors = [Counter.remote() for _ in range(50)]
    assert redray.get([a.incr.remote() for a in actors]) == [1] * 50
    for a in actors:
        redray.kill(a)
    deadline = time.monotonic() + 30
    while not all(dead(a) for a in actors) and time.monotonic() < deadline:
        time.sleep(0.05)
    del actors
for start in range(0, 1000, 100):
    groups = [placement_group([{"CPU": 0.01}]) for _ in range(100)]
    assert all(g.wait(10) for g in groups)
    for g in groups:
        remove_placement_group(g)
    del groups
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    redis_after = redis_figures()
    if redis_after["keys"] <= redis_before["keys"] and redis_after["groups"] <= 50:
        break
    time.sleep(0.1)
extra = {"redis_before": redis_before, "redis_after": redis_after}
""",
        env={"REDRAY_MAX_DEAD_ACTORS": "50", "REDRAY_MAX_REMOVED_PGS": "50"},
    )
    assert_back_to_baseline(figures)
    before, after = figures["redis_before"], figures["redis_after"]
    new_keys = sorted(set(after["names"]) - set(before["names"]))
    assert after["keys"] <= before["keys"], new_keys
    assert after["actors"] <= 50 and after["groups"] <= 50, after
    assert after["actor_specs"] == 0, after  # a dead actor's pickled arguments go at once


def test_100_init_shutdown_cycles():
    out = last_json(
        run_driver(
            MEASURE.replace("def figures():", "def cluster_figures():")
            + """
def figures():
    gc.collect()
    me = psutil.Process()
    return {"threads": threading.active_count(), "fds": me.num_fds(),
            "rss_mb": me.memory_info().rss / 2**20, "children": len(me.children())}

@redray.remote
def one():
    return 1

def cycle():
    redray.init(num_cpus=1)
    assert redray.get(one.remote()) == 1
    redray.shutdown()

for _ in range(5):
    cycle()
baseline = figures()
for _ in range(100):
    cycle()
deadline = time.monotonic() + 20
after = figures()
while time.monotonic() < deadline and (
    after["threads"] > baseline["threads"] or after["children"] > baseline["children"]
):
    time.sleep(0.1)
    after = figures()
print(json.dumps({"baseline": baseline, "after": after}))
""",
            timeout=500,
        ).stdout
    )
    print(json.dumps(out, indent=1))
    before, after = out["baseline"], out["after"]
    assert after["threads"] <= before["threads"]
    assert after["fds"] <= before["fds"]
    assert after["children"] == 0
    assert after["rss_mb"] <= before["rss_mb"] + 30
