"""Ray's scalability envelope (its release "single node" and "many" benchmarks), on redray or Ray.

What it measures
    One row per item of Ray's published envelope, at the sizes that fit one machine:
    queued no-op tasks (10k, 100k, 1M: throughput must stay flat as the queue grows), one
    task with 10,000 object arguments, one task returning 3,000 objects, one ``get`` of
    10,000 objects, ``wait`` on 100,000 refs, 1,000 then 5,000 actors (num_cpus=0, each
    called once), 1,000 placement groups alive at once, a numpy array of 25% of RAM through
    ``put``/``get`` and through a task, 50 nodes on this machine, and sync calls while the
    driver holds 10,000 owned or 10,000 borrowed refs.

    Every row reports its size, wall time, throughput (size / wall), the peak RSS and PSS
    summed over every process of the cluster (the driver included; psutil
    ``memory_full_info``, sampled in a background thread) and the CPU-seconds all those
    processes spent per operation. Each row runs in a fresh process with a fresh cluster,
    so a row's memory and failures are its own; a row that exceeds ``--row-timeout`` is
    killed and reported as an error.

    The workloads are written once against a module object ``ray``, so the same code runs
    with ``--backend redray`` (``import redray as ray``) or ``--backend ray``. Ray runs
    the same rows at the sizes it completes here (``ray_sizes``; ``--ray-size`` overrides).

How to run it (from the repository root)
    python scripts/scalebench.py --quick                  # small sizes, redray only
    python scripts/scalebench.py --vs ray                 # full sizes, redray vs Ray
    python scripts/scalebench.py --only actors --size actors=200 --json
    python scripts/scalebench.py --list                   # row names and sizes
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("redray", "ray")
MB = 2**20


# --------------------------------------------------------------------------- measuring


class ClusterMonitor:
    """Peak RSS/PSS and CPU-seconds of this process and every descendant (the cluster).

    A background thread samples the process tree; reading PSS (smaps) of a thousand
    processes takes a while, so the interval grows with the time a sample takes."""

    def __init__(self, min_interval: float = 0.2) -> None:
        self.min_interval = min_interval
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_processes = 0
        self.cpu: dict[int, float] = {}
        self.cpu_start: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def __enter__(self) -> ClusterMonitor:
        self.cpu_start = dict(self.sample())
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def processes(self) -> list[psutil.Process]:
        me = psutil.Process()
        try:
            return [me, *me.children(recursive=True)]
        except psutil.Error:
            return [me]

    def sample(self) -> dict[int, float]:
        rss = pss = 0
        cpus = {}
        procs = self.processes()
        for proc in procs:
            try:
                info = proc.memory_full_info()
                times = proc.cpu_times()
            except psutil.Error:
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
            cpus[proc.pid] = times.user + times.system
        with self._lock:
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_processes = max(self.peak_processes, len(procs))
            for pid, cpu in cpus.items():
                self.cpu[pid] = max(self.cpu.get(pid, 0.0), cpu)
        return cpus

    def _run(self) -> None:
        interval = self.min_interval
        while not self._stop.wait(interval):
            start = time.monotonic()
            self.sample()
            interval = max(self.min_interval, 3 * (time.monotonic() - start))

    def cpu_seconds(self) -> float:
        """CPU spent since the start by every process seen (processes that died count up
        to their last sample)."""
        with self._lock:
            return sum(cpu - self.cpu_start.get(pid, 0.0) for pid, cpu in self.cpu.items())

    def current_rss(self) -> int:
        total = 0
        for proc in self.processes():
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def reset_peaks(self) -> None:
        with self._lock:
            self.peak_rss = self.peak_pss = self.peak_processes = 0


@dataclass
class Measure:
    """One line of the report."""

    row: str
    size: int
    ops: int = 0
    wall_s: float | None = None
    throughput: float | None = None
    peak_rss_mb: float | None = None
    peak_pss_mb: float | None = None
    cpu_s_per_op: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class Timer:
    """Times one phase of a row under a monitor and turns it into a Measure."""

    def __init__(self, monitor: ClusterMonitor, row: str, size: int, ops: int | None = None):
        self.monitor, self.row, self.size = monitor, row, size
        self.ops = size if ops is None else ops
        self.measure = Measure(row=row, size=size, ops=self.ops)

    def __enter__(self) -> Timer:
        self.monitor.sample()
        self.cpu0 = self.monitor.cpu_seconds()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        wall = time.perf_counter() - self.t0
        self.monitor.sample()
        m = self.measure
        m.wall_s = wall
        m.throughput = self.ops / wall if wall > 0 else None
        m.peak_rss_mb = self.monitor.peak_rss / MB
        m.peak_pss_mb = self.monitor.peak_pss / MB
        m.cpu_s_per_op = (self.monitor.cpu_seconds() - self.cpu0) / max(1, self.ops)
        m.extra.setdefault("processes", self.monitor.peak_processes)


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    name: str
    run: Callable[[ModuleType, list[int], ClusterMonitor], list[Measure]]
    sizes: tuple[int, ...]
    quick: tuple[int, ...]
    ray_sizes: tuple[int, ...]
    init: dict[str, Any] = field(default_factory=dict)
    bound: str = ""


def noop_factory(ray: ModuleType) -> Any:
    @ray.remote
    def noop() -> int:
        return 1

    return noop


def row_tasks_queued(ray: ModuleType, sizes: list[int], mon: ClusterMonitor) -> list[Measure]:
    """N no-op tasks submitted by one driver, then every result fetched."""
    noop = noop_factory(ray)
    ray.get([noop.remote() for _ in range(100)])
    out = []
    for n in sizes:
        mon.reset_peaks()
        rss_before = mon.current_rss()
        with Timer(mon, "tasks queued", n) as t:
            t0 = time.perf_counter()
            refs = [noop.remote() for _ in range(n)]
            submitted = time.perf_counter() - t0
            rss_pending = mon.current_rss() - rss_before
            total = sum(ray.get(refs))
        assert total == n, total
        del refs
        t.measure.extra.update(
            submit_s=round(submitted, 2), bytes_per_pending_task=round(rss_pending / n)
        )
        out.append(t.measure)
    return out


def row_many_args(ray: ModuleType, sizes: list[int], mon: ClusterMonitor) -> list[Measure]:
    @ray.remote
    def count(*args: Any) -> int:
        return sum(args)

    out = []
    for n in sizes:
        refs = [ray.put(1) for _ in range(n)]
        with Timer(mon, "object arguments to one task", n) as t:
            assert ray.get(count.remote(*refs)) == n
        out.append(t.measure)
    return out


def row_many_returns(ray: ModuleType, sizes: list[int], mon: ClusterMonitor) -> list[Measure]:
    out = []
    for n in sizes:

        @ray.remote(num_returns=n)
        def many(k: int) -> list[int]:
            return list(range(k))

        with Timer(mon, "objects returned from one task", n) as t:
            refs = many.remote(n)
            assert ray.get(refs) == list(range(n))
        out.append(t.measure)
    return out


def row_get_many(ray: ModuleType, sizes: list[int], mon: ClusterMonitor) -> list[Measure]:
    out = []
    for n in sizes:
        refs = [ray.put(i) for i in range(n)]
        with Timer(mon, "objects in one get", n) as t:
            assert ray.get(refs) == list(range(n))
        out.append(t.measure)
    return out


def row_wait_many(ray: ModuleType, sizes: list[int], mon: ClusterMonitor) -> list[Measure]:
    out = []
    for n in sizes:
        refs = [ray.put(i) for i in range(n)]
        with Timer(mon, "wait on refs", n) as t:
            ready, rest = ray.wait(refs, num_returns=n, timeout=600)
        assert len(ready) == n and not rest
        out.append(t.measure)
    return out


def make_idle_actor(ray: ModuleType) -> Any:
    @ray.remote(num_cpus=0)
    class Idle:
        def ping(self) -> int:
            return 1

    return Idle


def worker_pss(procs: list[psutil.Process], skip: set[int]) -> list[float]:
    values = []
    for proc in procs:
        if proc.pid in skip:
            continue
        try:
            values.append(proc.memory_full_info().pss / MB)
        except psutil.Error:
            pass
    return values


def idle_redis_per_actor(n: int, window: float = 5.0) -> dict[str, float]:
    """Redis connections held and commands sent per idle actor (redray's control plane)."""
    from redray.core import context

    client = context.current.gcs.redis
    c0 = redis_commands(client)
    time.sleep(window)
    c1 = redis_commands(client)
    calls = sum(c1.values()) - sum(c0.values()) - 1
    return {
        "redis_clients": int(client.info("clients")["connected_clients"]),
        "redis_commands_per_s_per_actor": round(calls / window / n, 3),
    }


def row_actors(ray: ModuleType, sizes: list[int], mon: ClusterMonitor) -> list[Measure]:
    """N actors (num_cpus=0) created and each called once; then their idle PSS each."""
    idle = make_idle_actor(ray)
    out = []
    for n in sizes:
        before = {p.pid for p in mon.processes()}
        mon.reset_peaks()
        with Timer(mon, "actors created and called", n) as t:
            actors = [idle.remote() for _ in range(n)]
            assert sum(ray.get([a.ping.remote() for a in actors], timeout=3600)) == n
        time.sleep(2)  # idle: what each one costs while it waits
        if ray.__name__ == "redray":
            t.measure.extra.update(idle_redis_per_actor(n))
        pss = sorted(worker_pss(mon.processes(), before))
        if pss:
            t.measure.extra.update(
                new_processes=len(pss),
                median_pss_mb_per_new_process=round(pss[len(pss) // 2], 2),
                pss_mb_per_actor=round(sum(pss) / n, 2),
            )
        for a in actors:
            ray.kill(a)
        del actors
        out.append(t.measure)
        time.sleep(2)
    return out


def row_placement_groups(ray: ModuleType, sizes: list[int], mon: ClusterMonitor) -> list[Measure]:
    from importlib import import_module

    util = import_module(f"{ray.__name__}.util")
    out = []
    for n in sizes:
        with Timer(mon, "placement groups alive", n) as t:
            pgs = [util.placement_group([{"pg_slot": 1}]) for _ in range(n)]
            ray.get([pg.ready() for pg in pgs], timeout=3600)
        with Timer(mon, "placement groups removed", n) as r:
            for pg in pgs:
                util.remove_placement_group(pg)
        t.measure.extra["remove_s"] = round(r.measure.wall_s or 0, 2)
        out.append(t.measure)
    return out


def row_large_object(ray: ModuleType, sizes: list[int], mon: ClusterMonitor) -> list[Measure]:
    """A numpy array of `size` MiB through put/get, and returned by a task."""
    import numpy as np

    @ray.remote
    def make(n_bytes: int) -> Any:
        arr = np.ones(n_bytes // 8, dtype=np.int64)
        return arr

    @ray.remote
    def checksum(arr: Any) -> int:
        return int(arr[:: 4096 // 8].sum())

    out = []
    for mib in sizes:
        n_bytes = mib * MB
        arr = np.ones(n_bytes // 8, dtype=np.int64)
        mon.reset_peaks()
        with Timer(mon, "large object put/get (MiB)", mib, ops=1) as t:
            ref = ray.put(arr)
            back = ray.get(ref)
            assert back.shape == arr.shape and int(back[-1]) == 1
            expect = len(arr[:: 4096 // 8])
            assert ray.get(checksum.remote(ref)) == expect
        del arr, back, ref
        t.measure.extra["GB_per_s"] = round(n_bytes / 1e9 / (t.measure.wall_s or 1), 2)
        out.append(t.measure)
        mon.reset_peaks()
        with Timer(mon, "large object from a task (MiB)", mib, ops=1) as t2:
            back = ray.get(make.remote(n_bytes))
            assert back.nbytes == n_bytes and int(back[0]) == 1
        del back
        t2.measure.extra["GB_per_s"] = round(n_bytes / 1e9 / (t2.measure.wall_s or 1), 2)
        out.append(t2.measure)
    return out


def rate(fn: Callable[[], Any], seconds: float, mon: ClusterMonitor) -> tuple[float, float]:
    """Calls per second, and CPU-seconds per call over every process of the cluster."""
    fn()
    mon.sample()
    cpu0 = mon.cpu_seconds()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            fn()
        n += 10
    wall = time.perf_counter() - start
    mon.sample()
    return n / wall, (mon.cpu_seconds() - cpu0) / n


def row_held_refs(ray: ModuleType, sizes: list[int], mon: ClusterMonitor) -> list[Measure]:
    """Sync tasks and actor calls with nothing held, N owned refs held, N borrowed refs held.

    Each state is measured three times, interleaved, and the best rate kept: on a loaded
    machine the noise is one-sided."""
    noop = noop_factory(ray)
    idle = make_idle_actor(ray)

    @ray.remote
    def make_refs(n: int) -> list[Any]:
        return [ray.put(i) for i in range(n)]

    actor = idle.remote()
    ray.get(actor.ping.remote())
    out = []
    for n in sizes:
        best: dict[str, list[float]] = {}
        for _ in range(3):
            for state in ("none", "owned", "borrowed"):
                held = None
                if state == "owned":
                    held = [ray.put(i) for i in range(n)]
                elif state == "borrowed":
                    held = ray.get(make_refs.remote(n))
                task_rate, task_cpu = rate(lambda: ray.get(noop.remote()), 1.0, mon)
                call_rate, call_cpu = rate(lambda: ray.get(actor.ping.remote()), 1.0, mon)
                prev = best.get(state, [0.0, 0.0, 1.0, 1.0])
                best[state] = [
                    max(prev[0], task_rate),
                    max(prev[1], call_rate),
                    min(prev[2], task_cpu),
                    min(prev[3], call_cpu),
                ]
                del held
        for state, (task_rate, call_rate, task_cpu, call_cpu) in best.items():
            m = Measure(
                row=f"sync tasks, {state} refs held",
                size=n if state != "none" else 0,
                throughput=task_rate,
                cpu_s_per_op=task_cpu,
            )
            m.extra["actor_calls_per_s"] = round(call_rate)
            m.extra["actor_call_cpu_us"] = round(call_cpu * 1e6, 1)
            m.extra["vs_none"] = round(task_rate / best["none"][0], 3)
            m.extra["actor_vs_none"] = round(call_rate / best["none"][1], 3)
            out.append(m)
    return out


# ------------------------------------------------------------------ nodes (multi-node)


def redis_commands(client: Any) -> dict[str, int]:
    """Calls so far per command (commands run by Lua scripts included)."""
    return {
        k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in client.info("commandstats").items()
    }


def heartbeat_bytes(client: Any) -> float:
    """Mean size of the nodes' heartbeat values (what each beat writes)."""
    sizes = [client.strlen(k) for k in client.scan_iter(match="*:hb:*", count=1000)]
    return sum(sizes) / len(sizes) if sizes else 0.0


def row_nodes_redray(ray: ModuleType, sizes: list[int], mon: ClusterMonitor) -> list[Measure]:
    """N one-CPU nodes (raylet processes with 64 MiB stores) on this machine."""
    return [m for n in sizes for m in _redray_nodes(ray, n, mon)]


def _redray_nodes(ray: ModuleType, n: int, mon: ClusterMonitor) -> list[Measure]:
    import redis

    from redray.gcs import Gcs
    from redray.node import launch as node_mod
    from redray.node.redis_server import RedisServer
    from redray.transport.protocol import new_token

    out = []
    server = RedisServer.start(password=os.urandom(8).hex())
    server.wait_ready()
    token = new_token()
    gcs = Gcs(server.url)
    gcs.init_cluster(token)
    nodes: list[Any] = []
    lock = threading.Lock()

    def start(i: int) -> None:
        ip = f"127.0.{1 + i // 250}.{1 + i % 250}"
        started = node_mod.start_node(
            head=i == 0,
            token=token,
            cluster="default",
            resources=node_mod.default_resources(1, None, None, ip, head=i == 0),
            object_store_memory=64 * MB,
            node_ip_address=ip,
            gcs_url=server.url,
            private=True,
            timeout=600,
        )
        with lock:
            nodes.append(started)

    try:
        with Timer(mon, "nodes joined", n) as join:
            start(0)
            threads = [threading.Thread(target=start, args=(i,)) for i in range(1, n)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            while sum(1 for x in gcs.nodes() if x["alive"]) < n:
                time.sleep(0.1)
        out.append(join.measure)
        client = redis.Redis.from_url(server.url, socket_timeout=10)
        time.sleep(3)
        window = 10.0
        node_procs = [p for p in mon.processes() if p.pid != os.getpid()]
        cpu0 = sum(_cpu(p) for p in node_procs)
        c0 = redis_commands(client)
        time.sleep(window)
        c1 = redis_commands(client)
        cpu1 = sum(_cpu(p) for p in node_procs)
        idle = Measure(row="idle nodes: Redis commands/s per node", size=n)
        per_command = {k: (v - c0.get(k, 0)) / window / n for k, v in c1.items()}
        per_command["info"] = max(0.0, per_command.get("info", 0.0) - 1 / window / n)
        idle.throughput = sum(per_command.values())
        idle.extra["per_command"] = {
            k: round(v, 2) for k, v in sorted(per_command.items(), key=lambda kv: -kv[1]) if v > 0
        }
        idle.extra["heartbeat_bytes"] = round(heartbeat_bytes(client))
        idle.cpu_s_per_op = (cpu1 - cpu0) / window / n
        idle.extra["cpu_fraction_per_node"] = round(idle.cpu_s_per_op, 4)
        idle.extra["redis_used_memory_mb"] = round(client.info("memory")["used_memory"] / MB, 1)
        out.append(idle)
        client.close()
        ray.init(address=server.url, _node_ip_address="127.0.1.1")
        noop = noop_factory(ray)
        tasks = 20 * n
        ray.get([noop.options(scheduling_strategy="SPREAD").remote() for _ in range(2 * n)])
        with Timer(mon, f"tasks spread over {n} nodes", tasks) as spread:
            refs = [noop.options(scheduling_strategy="SPREAD").remote() for _ in range(tasks)]
            assert sum(ray.get(refs, timeout=600)) == tasks
        out.append(spread.measure)
        ray.get([noop.remote() for _ in range(100)])
        with Timer(mon, "tasks on the driver's node", tasks) as local:
            assert sum(ray.get([noop.remote() for _ in range(tasks)], timeout=600)) == tasks
        out.append(local.measure)
    finally:
        try:
            ray.shutdown()
        except Exception:
            pass
        for started in nodes:
            started.stop()
            node_mod.remove_session_dir(started.session_dir)
        gcs.close()
        server.stop()
    return out


def _cpu(proc: psutil.Process) -> float:
    try:
        t = proc.cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


def row_nodes_ray(ray: ModuleType, sizes: list[int], mon: ClusterMonitor) -> list[Measure]:
    """Ray's own multi-node-on-one-machine helper (ray.cluster_utils.Cluster)."""
    from ray.cluster_utils import Cluster

    out = []
    for n in sizes:
        cluster = Cluster()
        try:
            with Timer(mon, "nodes joined", n) as join:
                cluster.add_node(num_cpus=1, object_store_memory=80 * MB)
                for _ in range(n - 1):
                    cluster.add_node(num_cpus=1, object_store_memory=80 * MB)
                cluster.wait_for_nodes()
            out.append(join.measure)
            ray.init(address=cluster.address)
            noop = noop_factory(ray)
            tasks = 20 * n
            ray.get([noop.options(scheduling_strategy="SPREAD").remote() for _ in range(2 * n)])
            with Timer(mon, f"tasks spread over {n} nodes", tasks) as spread:
                refs = [noop.options(scheduling_strategy="SPREAD").remote() for _ in range(tasks)]
                assert sum(ray.get(refs, timeout=600)) == tasks
            out.append(spread.measure)
            with Timer(mon, "tasks on the driver's node", tasks) as local:
                assert sum(ray.get([noop.remote() for _ in range(tasks)], timeout=600)) == tasks
            out.append(local.measure)
        finally:
            ray.shutdown()
            cluster.shutdown()
    return out


def redis_cpu(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def row_simulated_nodes(ray: ModuleType, sizes: list[int], mon: ClusterMonitor) -> list[Measure]:
    """What one Redis carries: N registered nodes beating through redray's own GCS calls
    (no raylets), measured as Redis CPU per beat; the old per-beat read of every node
    (``live_nodes``) beside the read of changes only (``node_changes``)."""
    if ray.__name__ != "redray":
        return []
    import redis

    from redray.gcs import Gcs
    from redray.node.redis_server import RedisServer

    out = []
    for n in sizes:
        server = RedisServer.start(password=os.urandom(8).hex())
        server.wait_ready()
        gcs = Gcs(server.url)
        client = redis.Redis.from_url(server.url, socket_timeout=10)
        try:
            gcs.init_cluster(b"x" * 32)
            ids = [f"sim{i:05d}" for i in range(n)]
            payload = {"CPU": 1.0, "memory": 1e9}
            info = {"raylet_address": ["127.0.0.1", 1], "resources": payload}
            for node_id in ids:
                gcs.register_node(node_id, {**info, "available": payload}, ttl=600)
            for node_id in ids:  # steady state: each node's beat as it will stay
                gcs.heartbeat(node_id, payload, 600, {"pending": 0})
            views = {node_id: gcs.node_changes(None) for node_id in ids}
            modes = (("changes, idle", 3), ("changes, all busy", 1), ("every node", 1))
            for mode, rounds in modes:
                cpu0, beats, start = redis_cpu(client), 0, time.perf_counter()
                for r in range(rounds):
                    pending = r + 1 if mode == "changes, all busy" else 0
                    for node_id in ids:
                        gcs.heartbeat(node_id, payload, 600, {"pending": pending})
                        if mode.startswith("changes"):
                            views[node_id] = gcs.node_changes(views[node_id])
                        else:
                            gcs.live_nodes()
                        beats += 1
                wall = time.perf_counter() - start
                per_beat = (redis_cpu(client) - cpu0) / beats
                m = Measure(row=f"simulated nodes, beat + read ({mode})", size=n, ops=beats)
                m.wall_s, m.throughput = wall, beats / wall
                m.extra["redis_cpu_us_per_beat"] = round(per_beat * 1e6, 1)
                m.extra["nodes_per_redis_core_at_2_beats_per_s"] = round(1 / per_beat / 2)
                out.append(m)
        finally:
            client.close()
            gcs.close()
            server.stop()
    return out


def row_nodes(ray: ModuleType, sizes: list[int], mon: ClusterMonitor) -> list[Measure]:
    if ray.__name__ == "ray":
        return row_nodes_ray(ray, sizes, mon)
    return row_nodes_redray(ray, sizes, mon)


TOTAL_MIB = psutil.virtual_memory().total // MB

ROWS = [
    Row(
        "tasks queued",
        row_tasks_queued,
        (10_000, 100_000, 1_000_000),
        (2_000, 20_000),
        (10_000, 100_000),
        {"num_cpus": 2},
        "one driver submitting; the 2 CPUs run the tasks",
    ),
    Row(
        "object arguments to one task",
        row_many_args,
        (10_000,),
        (1_000,),
        (10_000,),
        {"num_cpus": 2},
    ),
    Row(
        "objects returned from one task",
        row_many_returns,
        (3_000,),
        (300,),
        (3_000,),
        {"num_cpus": 2},
    ),
    Row("objects in one get", row_get_many, (10_000,), (1_000,), (10_000,), {"num_cpus": 2}),
    Row("wait on refs", row_wait_many, (100_000,), (10_000,), (100_000,), {"num_cpus": 2}),
    Row(
        "actors",
        row_actors,
        (1_000, 5_000),
        (50,),
        (200,),
        {"num_cpus": 2},
        "one process per actor: memory",
    ),
    Row(
        "placement groups",
        row_placement_groups,
        (1_000,),
        (100,),
        (1_000,),
        {"num_cpus": 2, "resources": {"pg_slot": 100_000}},
    ),
    Row(
        "large object",
        row_large_object,
        (TOTAL_MIB // 4,),
        (256,),
        (TOTAL_MIB // 4,),
        {"num_cpus": 2, "object_store_memory": (TOTAL_MIB // 4 + 1024) * MB},
        "memory bandwidth",
    ),
    Row("nodes", row_nodes, (50,), (5,), (4,), {}, "one raylet process per node"),
    Row("simulated nodes", row_simulated_nodes, (1_000,), (100,), (), {}, "one Redis core"),
    Row("held refs", row_held_refs, (10_000,), (10_000,), (10_000,), {"num_cpus": 2}),
]


def find_row(name: str) -> Row:
    for row in ROWS:
        if row.name == name:
            return row
    raise SystemExit(f"no row {name!r}; rows: {', '.join(r.name for r in ROWS)}")


# --------------------------------------------------------------------------- runner


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def backend_env(backend: str) -> dict[str, str]:
    env = dict(os.environ)
    if backend == "redray":
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
    return env


def import_backend(backend: str) -> ModuleType:
    if backend == "redray" and str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module(backend)


def run_row_here(backend: str, name: str, sizes: list[int]) -> list[dict[str, Any]]:
    """Run one row in this process (a child of the script): init, measure, shutdown."""
    row = find_row(name)
    ray = import_backend(backend)
    with ClusterMonitor() as mon:
        try:
            if row.init:
                ray.init(**row.init)
            measures = row.run(ray, sizes, mon)
        except Exception as e:
            traceback.print_exc()
            measures = [Measure(row=name, size=max(sizes), error=first_line(e))]
        finally:
            try:
                ray.shutdown()
            except Exception:
                pass
    return [asdict(m) for m in measures]


def run_row_child(backend: str, row: Row, sizes: list[int], timeout: float) -> list[dict]:
    """Run one row in a fresh process; a crash or timeout becomes an error line."""
    log(f"--- {backend}: {row.name} {sizes}")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--backend", backend]
        cmd += ["--row-here", row.name, "--sizes", ",".join(map(str, sizes)), "--json-out", out]
        proc = subprocess.Popen(cmd, stdout=sys.stderr, env=backend_env(backend))
        try:
            code = proc.wait(timeout=timeout if timeout > 0 else None)
            error = f"row process exited with code {code}"
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            proc.wait()
            error = f"row exceeded --row-timeout {timeout:g} s"
        if os.path.exists(out):
            with open(out) as f:
                return json.load(f)
    return [asdict(Measure(row=row.name, size=max(sizes), error=error))]


def _kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass


def sizes_for(row: Row, backend: str, args: argparse.Namespace) -> list[int]:
    overrides = dict(args.size) if backend == "redray" else dict(args.ray_size)
    if row.name in overrides:
        return [int(x) for x in overrides[row.name].split(",")]
    if args.quick:
        return list(row.quick)
    return list(row.ray_sizes if backend == "ray" else row.sizes)


def selected(name: str, only: list[str]) -> bool:
    return not only or any(p.lower() in name.lower() for p in only)


def run_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    lines: list[dict] = []
    for row in ROWS:
        sizes = sizes_for(row, backend, args)
        if selected(row.name, args.only) and sizes:
            new = run_row_child(backend, row, sizes, args.row_timeout)
            for line in new:
                log(format_line(line))
            lines += new
    return {
        "backend": backend,
        "version": version_of(backend),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_before": os.getloadavg(),
        "lines": lines,
    }


def version_of(backend: str) -> str:
    try:
        return importlib.metadata.version(backend)
    except Exception:
        return "?"


# --------------------------------------------------------------------------- output


def num(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:,.{digits}f}"
    return f"{value:.3g}"


def format_line(line: dict[str, Any]) -> str:
    if line["error"]:
        return f"{line['row']} [{line['size']:,}]: ERROR {line['error']}"
    return (
        f"{line['row']} [{line['size']:,}]: {num(line['wall_s'])} s, {num(line['throughput'])}/s, "
        f"RSS {num(line['peak_rss_mb'])} MB, PSS {num(line['peak_pss_mb'])} MB, "
        f"{num(line['cpu_s_per_op'] and line['cpu_s_per_op'] * 1e6)} CPU-µs/op {line['extra']}"
    )


def render_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    out = [" | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    out.append("-+-".join("-" * w for w in widths))
    for r in rows:
        out.append(
            " | ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(out)


def cells(line: dict[str, Any] | None) -> list[str]:
    if line is None:
        return ["-"] * 5
    if line["error"]:
        return [f"{line['size']:,}", "ERROR " + line["error"][:60], "", "", ""]
    cpu = line["cpu_s_per_op"]
    return [
        f"{line['size']:,}",
        f"{num(line['wall_s'])} s, {num(line['throughput'])}/s",
        num(line["peak_rss_mb"]),
        num(line["peak_pss_mb"]),
        num(cpu * 1e6) if cpu is not None else "-",
    ]


def render_markdown(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def print_report(
    ours: dict[str, Any], theirs: dict[str, Any] | None, markdown: bool = False
) -> None:
    for rep in (ours, theirs):
        if rep:
            print(
                f"{rep['backend']} {rep['version']}, Python {rep['python']}, "
                f"{rep['cpu_count']} CPUs, {rep['memory_gib']} GiB, load before "
                f"{' '.join(f'{x:.1f}' for x in rep['load_before'])}"
            )
    head = ["row", "size", f"{ours['backend']} wall, rate", "RSS MB", "PSS MB", "CPU-µs/op"]
    if theirs:
        head += ["Ray size", "Ray wall, rate", "RSS MB", "PSS MB", "CPU-µs/op", "rate ratio"]
    other: dict[str, list[dict]] = {}
    for line in theirs["lines"] if theirs else []:
        other.setdefault(line["row"], []).append(line)
    table = []
    used: set[int] = set()
    for line in ours["lines"]:
        row = [line["row"], *cells(line)]
        if theirs:
            peers = other.get(line["row"], [])
            match = next((p for p in peers if p["size"] == line["size"]), None)
            match = match or (peers[-1] if peers and line["size"] >= peers[-1]["size"] else None)
            if match is not None:
                used.add(id(match))
            ratio = "-"
            if match and not match["error"] and not line["error"]:
                if match["throughput"] and line["throughput"]:
                    ratio = f"{line['throughput'] / match['throughput']:.2f}x"
            row += [*cells(match), ratio]
        table.append(row)
    for lines in other.values():
        for line in lines:
            if id(line) not in used:
                table.append([line["row"], *(["-"] * 5), *cells(line), "-"])
    print((render_markdown if markdown else render_table)(head, table))
    print("rate ratio = redray/Ray throughput (Ray at its own size where the sizes differ)")
    for line in ours["lines"] + (theirs["lines"] if theirs else []):
        if line["extra"] and not line["error"]:
            print(f"  {line['row']} [{line['size']:,}] extra: {line['extra']}")


def write_json(data: Any, path: str) -> None:
    text = json.dumps(data, indent=2)
    if path == "-":
        print(text)
        return
    with open(path, "w") as f:
        f.write(text + "\n")


# --------------------------------------------------------------------------- CLI


def key_value(text: str) -> tuple[str, str]:
    name, _, value = text.rpartition("=")
    if not name or not value:
        raise argparse.ArgumentTypeError("expected ROW=N[,N...]")
    return name, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Ray's scalability envelope on redray or Ray.")
    p.add_argument("--backend", choices=BACKENDS, default="redray", help="default: redray")
    p.add_argument("--vs", choices=["ray"], help="run redray then Ray, print one table")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--only", action="append", default=[], metavar="SUBSTRING")
    p.add_argument("--size", action="append", type=key_value, default=[], metavar="ROW=N,...")
    p.add_argument("--ray-size", action="append", type=key_value, default=[], metavar="ROW=N")
    p.add_argument("--row-timeout", type=float, default=1800.0, help="seconds (0: never)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--json-out", metavar="PATH", help="also write JSON results to PATH")
    p.add_argument("--list", action="store_true", help="print the rows and their sizes")
    p.add_argument("--from-json", metavar="PATH", help="print the report of an earlier run")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--row-here", help=argparse.SUPPRESS)
    p.add_argument("--sizes", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.list:
        for row in ROWS:
            print(f"{row.name}: {row.sizes} (quick {row.quick}, Ray {row.ray_sizes})")
        return
    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
        ours, theirs = (data["redray"], data["ray"]) if "redray" in data else (data, None)
        print_report(ours, theirs, args.markdown)
        return
    if args.row_here:
        lines = run_row_here(args.backend, args.row_here, [int(x) for x in args.sizes.split(",")])
        write_json(lines, args.json_out or "-")
        return
    ours = run_backend("redray" if args.vs else args.backend, args)
    theirs = run_backend("ray", args) if args.vs else None
    if args.json or args.json_out:
        write_json({"redray": ours, "ray": theirs} if args.vs else ours, args.json_out or "-")
    if not args.json:
        print_report(ours, theirs, args.markdown)


if __name__ == "__main__":
    main()
