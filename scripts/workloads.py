"""Realistic jobs on redray, Ray and Dask distributed, the same code shape on each.

What it measures
    - sort: a distributed sort of 2 GB of int64: 16 map tasks each make and bucket a
      partition (16 return objects), 16 reduce tasks each sort one bucket from every map;
      the buckets move through the object store (Dask: through its workers' memory).
    - parameter server: one server holding 10 MB of float32 weights, 8 workers each
      computing a 10 MB gradient from the current weights, 100 synchronous rounds.
    - monte carlo pi: 10,000 tasks of 10,000 samples each, summed by the driver.
    - tree reduction: 1,000 partial results (arrays of 1,000 float64) added pairwise by
      tasks until one is left.
    - actor pool map: 100,000 items through a pool of 2 stateful workers (Ray:
      ``ActorPool.map``; Dask has no actor pool: ``client.map`` of a pure function).

    Each workload runs in a fresh process with a fresh 2-CPU cluster and reports wall time
    (the workload only, not start-up) and the peak RSS and PSS summed over every process of
    the cluster, the driver included (psutil ``memory_full_info``, sampled). Results are
    checked, so a wrong answer is an error, not a number.

How to run it (from the repository root)
    python scripts/workloads.py                  # every workload on every importable backend
    python scripts/workloads.py --quick          # small sizes (a smoke run)
    python scripts/workloads.py --only sort --backend redray --json

Dask distributed is a benchmark-only peer (``pip install "dask[distributed]"``), never a
dependency of redray.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import operator
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scalebench import MB, ClusterMonitor, backend_env, first_line, render_table  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("redray", "ray", "dask")
N_CPU = 2


@dataclass
class Result:
    workload: str
    backend: str
    size: str
    wall_s: float | None = None
    peak_rss_mb: float | None = None
    peak_pss_mb: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- backends


class RayLike:
    """redray or Ray: tasks, actors, get."""

    def __init__(self, name: str) -> None:
        if name == "redray" and str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))
        self.ray = importlib.import_module(name)
        self.util = importlib.import_module(f"{name}.util")
        self.ray.init(num_cpus=N_CPU)

    def task(self, fn: Callable, num_returns: int = 1, num_cpus: float = 1) -> Any:
        remote = self.ray.remote(num_returns=num_returns, num_cpus=num_cpus)(fn)
        return lambda *args: remote.remote(*args)

    def actor(self, cls: type, num_cpus: float = 0) -> Any:
        return self.ray.remote(num_cpus=num_cpus)(cls)

    def get(self, refs: Any) -> Any:
        return self.ray.get(refs)

    def close(self) -> None:
        self.ray.shutdown()


class Inline:
    """No runtime: every task and actor call runs at once in this process (what a
    workload's own work costs, for --compute-floor)."""

    class _Actor:
        def __init__(self, instance: Any) -> None:
            self._instance = instance

        def __getattr__(self, name: str) -> Any:
            method = getattr(self._instance, name)
            return type("Method", (), {"remote": staticmethod(method)})

    class util:  # noqa: N801 (stands for a runtime's `util` module)
        class ActorPool:
            def __init__(self, actors: list[Any]) -> None:
                self.actors = actors

            def map(self, fn: Callable, values: Any) -> Any:
                return (fn(self.actors[i % len(self.actors)], v) for i, v in enumerate(values))

    def task(self, fn: Callable, num_returns: int = 1, num_cpus: float = 1) -> Any:
        return fn

    def actor(self, cls: type, num_cpus: float = 0) -> Any:
        return type("Class", (), {"remote": staticmethod(lambda *a: Inline._Actor(cls(*a)))})

    def get(self, values: Any) -> Any:
        return values


class DaskLike:
    """Dask distributed on a local 2-worker, 1-thread-each cluster (processes)."""

    def __init__(self) -> None:
        from dask.distributed import Client, LocalCluster

        self.cluster = LocalCluster(
            n_workers=N_CPU, threads_per_worker=1, processes=True, dashboard_address=None
        )
        self.client = Client(self.cluster)

    def task(self, fn: Callable, num_returns: int = 1, num_cpus: float = 1) -> Any:
        client = self.client

        def submit(*args: Any) -> Any:
            fut = client.submit(fn, *args, pure=False)
            if num_returns == 1:
                return fut
            return [client.submit(operator.getitem, fut, i, pure=False) for i in range(num_returns)]

        return submit

    def get(self, futures: Any) -> Any:
        return self.client.gather(futures)

    def close(self) -> None:
        self.client.close()
        self.cluster.close()


# --------------------------------------------------------------------------- workloads


def sort_workload(b: Any, total_bytes: int) -> dict[str, Any]:
    parts = 16
    per_map = total_bytes // 8 // parts
    bounds = np.linspace(0, 2**62, parts + 1)[1:-1].astype(np.int64)

    def map_part(seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        data = rng.integers(0, 2**62, per_map, dtype=np.int64)
        data.sort(kind="stable")
        cuts = np.searchsorted(data, bounds)
        return list(np.split(data, cuts))

    def reduce_part(*pieces: np.ndarray) -> tuple[int, int, int, bool]:
        merged = np.concatenate(pieces)
        merged.sort()
        if len(merged) == 0:
            return 0, 0, 0, True
        return len(merged), int(merged[0]), int(merged[-1]), True

    mapper = b.task(map_part, num_returns=parts)
    reducer = b.task(reduce_part)
    maps = [mapper(seed) for seed in range(parts)]
    outs = b.get([reducer(*[maps[m][r] for m in range(parts)]) for r in range(parts)])
    assert sum(o[0] for o in outs) == per_map * parts
    nonempty = [o for o in outs if o[0]]
    assert all(a[2] <= b_[1] for a, b_ in zip(nonempty, nonempty[1:], strict=False))
    return {"rows": per_map * parts}


class ParameterServer:
    def __init__(self, n: int) -> None:
        self.weights = np.zeros(n, dtype=np.float32)

    def apply(self, *grads: np.ndarray) -> np.ndarray:
        for g in grads:
            self.weights -= 0.01 * g
        return self.weights

    def get(self) -> np.ndarray:
        return self.weights


class GradientWorker:
    def __init__(self, seed: int) -> None:
        self.seed = seed

    def compute(self, weights: np.ndarray) -> np.ndarray:
        return weights + np.float32(self.seed + 1)


def ps_workload_ray(b: RayLike, rounds: int, n_bytes: int) -> dict[str, Any]:
    n = n_bytes // 4
    server = b.actor(ParameterServer).remote(n)
    workers = [b.actor(GradientWorker).remote(i) for i in range(8)]
    weights = server.get.remote()
    for _ in range(rounds):
        weights = server.apply.remote(*[w.compute.remote(weights) for w in workers])
    return {"checksum": float(b.get(weights)[0])}


def ps_workload_dask(b: DaskLike, rounds: int, n_bytes: int) -> dict[str, Any]:
    n = n_bytes // 4

    def apply(weights: np.ndarray, *grads: np.ndarray) -> np.ndarray:
        weights = weights.copy()
        for g in grads:
            weights -= 0.01 * g
        return weights

    def compute(weights: np.ndarray, seed: int) -> np.ndarray:
        return weights + np.float32(seed + 1)

    client = b.client
    weights = client.submit(np.zeros, n, dtype=np.float32, pure=False)
    for _ in range(rounds):
        grads = [client.submit(compute, weights, i, pure=False) for i in range(8)]
        weights = client.submit(apply, weights, *grads, pure=False)
    return {"checksum": float(client.gather(weights)[0])}


def expected_ps_checksum(rounds: int) -> float:
    w = np.float32(0)
    for _ in range(rounds):
        grads = [w + np.float32(i + 1) for i in range(8)]
        for g in grads:
            w = np.float32(w - np.float32(0.01) * g)
    return float(w)


def pi_workload(b: Any, tasks: int, samples: int) -> dict[str, Any]:
    def sample(seed: int) -> int:
        rng = np.random.default_rng(seed)
        xy = rng.random((samples, 2))
        return int(((xy**2).sum(axis=1) <= 1.0).sum())

    run = b.task(sample)
    inside = sum(b.get([run(i) for i in range(tasks)]))
    pi = 4 * inside / (tasks * samples)
    assert abs(pi - np.pi) < 0.01, pi
    return {"pi": round(pi, 5)}


def tree_workload(b: Any, leaves: int, width: int) -> dict[str, Any]:
    def leaf(i: int) -> np.ndarray:
        return np.full(width, float(i))

    def add(a: np.ndarray, c: np.ndarray) -> np.ndarray:
        return a + c

    make, combine = b.task(leaf), b.task(add)
    level = [make(i) for i in range(leaves)]
    while len(level) > 1:
        nxt = [combine(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    total = b.get(level[0])
    assert total[0] == leaves * (leaves - 1) / 2
    return {}


class Doubler:
    def __init__(self) -> None:
        self.calls = 0

    def double(self, x: int) -> int:
        self.calls += 1
        return 2 * x


def pool_workload_ray(b: RayLike, items: int) -> dict[str, Any]:
    actors = [b.actor(Doubler, num_cpus=1).remote() for _ in range(N_CPU)]
    pool = b.util.ActorPool(actors)
    out = list(pool.map(lambda a, v: a.double.remote(v), range(items)))
    assert out == [2 * i for i in range(items)]
    return {}


def pool_workload_dask(b: DaskLike, items: int) -> dict[str, Any]:
    def double(x: int) -> int:
        return 2 * x

    out = b.client.gather(b.client.map(double, range(items), pure=False))
    assert out == [2 * i for i in range(items)]
    return {"note": "client.map (Dask has no actor pool)"}


@dataclass(frozen=True)
class Workload:
    name: str
    full: dict[str, int]
    quick: dict[str, int]
    run: Callable[[Any, str, dict[str, int]], dict[str, Any]]


def run_sort(b: Any, backend: str, p: dict[str, int]) -> dict[str, Any]:
    return sort_workload(b, p["bytes"])


def run_ps(b: Any, backend: str, p: dict[str, int]) -> dict[str, Any]:
    fn = ps_workload_dask if backend == "dask" else ps_workload_ray
    out = fn(b, p["rounds"], p["bytes"])
    expect = expected_ps_checksum(p["rounds"])
    assert abs(out["checksum"] - expect) <= 1e-3 * max(1.0, abs(expect)), (out, expect)
    return out


def run_pi(b: Any, backend: str, p: dict[str, int]) -> dict[str, Any]:
    return pi_workload(b, p["tasks"], p["samples"])


def run_tree(b: Any, backend: str, p: dict[str, int]) -> dict[str, Any]:
    return tree_workload(b, p["leaves"], p["width"])


def run_pool(b: Any, backend: str, p: dict[str, int]) -> dict[str, Any]:
    if backend == "dask":
        return pool_workload_dask(b, p["items"])
    return pool_workload_ray(b, p["items"])


WORKLOADS = [
    Workload("sort 2 GB int64 (16x16)", {"bytes": 2 * 10**9}, {"bytes": 64 * 10**6}, run_sort),
    Workload(
        "parameter server (8 workers, 10 MB)",
        {"rounds": 100, "bytes": 10 * 10**6},
        {"rounds": 10, "bytes": 10**6},
        run_ps,
    ),
    Workload(
        "monte carlo pi (10,000 tasks)",
        {"tasks": 10_000, "samples": 10_000},
        {"tasks": 1_000, "samples": 10_000},
        run_pi,
    ),
    Workload(
        "tree reduction (1,000 partials)",
        {"leaves": 1_000, "width": 1_000},
        {"leaves": 100, "width": 1_000},
        run_tree,
    ),
    Workload("actor pool map (100,000 items)", {"items": 100_000}, {"items": 5_000}, run_pool),
]


# --------------------------------------------------------------------------- runner


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def open_backend(backend: str) -> Any:
    return DaskLike() if backend == "dask" else RayLike(backend)


def run_here(backend: str, name: str, quick: bool) -> dict[str, Any]:
    """One workload on one backend in this process (a child of the script)."""
    workload = next(w for w in WORKLOADS if w.name == name)
    params = workload.quick if quick else workload.full
    result = Result(name, backend, ", ".join(f"{k}={v:,}" for k, v in params.items()))
    b = None
    with ClusterMonitor() as mon:
        try:
            b = open_backend(backend)
            mon.reset_peaks()
            start = time.perf_counter()
            result.extra = workload.run(b, backend, params)
            result.wall_s = time.perf_counter() - start
            mon.sample()
            result.peak_rss_mb = mon.peak_rss / MB
            result.peak_pss_mb = mon.peak_pss / MB
        except Exception as e:
            traceback.print_exc()
            result.error = first_line(e)
        finally:
            if b is not None:
                try:
                    b.close()
                except Exception:
                    pass
    return asdict(result)


def importable(backend: str) -> bool:
    module = "distributed" if backend == "dask" else backend
    if backend == "redray":
        return True
    return importlib.util.find_spec(module) is not None


def cpu_busy(seconds: float = 0.5) -> float:
    """The share of the machine's CPU time spent busy over `seconds` (Linux; else 0)."""

    def times() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # (all, idle + iowait)

    try:
        total0, idle0 = times()
        time.sleep(seconds)
        total1, idle1 = times()
    except (OSError, ValueError, IndexError):
        return 0.0
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def settle(limit: float) -> None:
    """Wait (at most `limit` s) for the machine to go quiet: what the previous run left
    exiting (a peer's worker processes, its store) must not be timed against the next."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and cpu_busy() > 0.1:
        pass


def run_child(backend: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    settle(args.settle)
    log(f"--- {backend}: {name}")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--backend", backend]
        cmd += ["--here", name, "--json-out", out] + (["--quick"] if args.quick else [])
        proc = subprocess.Popen(cmd, stdout=sys.stderr, env=backend_env(backend))
        try:
            code = proc.wait(timeout=args.timeout or None)
            error = f"workload process exited with code {code}"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            error = f"workload exceeded --timeout {args.timeout:g} s"
        if os.path.exists(out):
            with open(out) as f:
                return json.load(f)
    return asdict(Result(name, backend, "", error=error))


def cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    if r["error"]:
        return "ERROR " + r["error"][:50]
    return f"{r['wall_s']:.2f} s, {r['peak_rss_mb']:,.0f} MB RSS / {r['peak_pss_mb']:,.0f} PSS"


def print_table(results: list[dict[str, Any]], backends: list[str]) -> None:
    print(f"{os.cpu_count()} CPUs, load {' '.join(f'{x:.1f}' for x in os.getloadavg())} (after)")
    by = {(r["workload"], r["backend"]): r for r in results}
    rows = []
    for w in WORKLOADS:
        if not any((w.name, b) in by for b in backends):
            continue
        cells = [cell(by.get((w.name, b))) for b in backends]
        ours = by.get((w.name, "redray"))
        peers = [by.get((w.name, b)) for b in backends if b != "redray"]
        peers = [p for p in peers if p and not p["error"]]
        ratio = "-"
        if ours and not ours["error"] and peers:
            ratio = f"{min(p['wall_s'] for p in peers) / ours['wall_s']:.2f}x"
        rows.append([w.name, *cells, ratio])
    print(render_table(["workload", *backends, "fastest peer / redray"], rows))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Realistic jobs on redray, Ray and Dask.")
    p.add_argument("--backend", action="append", choices=BACKENDS, help="default: every one")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--only", action="append", default=[], metavar="SUBSTRING")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per workload")
    p.add_argument(
        "--settle",
        type=float,
        default=30.0,
        help="before each run, wait up to this many seconds for the CPUs to go quiet",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--json-out", metavar="PATH")
    p.add_argument(
        "--compute-floor",
        action="store_true",
        help="run each workload inline in this process (no runtime) and print the CPU "
        f"seconds of its own work, and that over {N_CPU} CPUs: no runtime finishes sooner",
    )
    p.add_argument("--here", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def compute_floor(args: argparse.Namespace) -> None:
    """Each workload's own work, timed with no runtime around it."""
    for w in WORKLOADS:
        if args.only and not any(s.lower() in w.name.lower() for s in args.only):
            continue
        start = time.process_time()
        w.run(Inline(), "inline", w.quick if args.quick else w.full)
        cpu = time.process_time() - start
        print(
            f"{w.name}: {cpu:.1f} CPU-seconds of its own work, {cpu / N_CPU:.1f} s on {N_CPU} CPUs"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.compute_floor:
        compute_floor(args)
        return
    if args.here:
        result = run_here(args.backend[0], args.here, args.quick)
        with open(args.json_out, "w") as f:
            json.dump(result, f)
        return
    backends = [b for b in (args.backend or list(BACKENDS)) if importable(b)]
    results = []
    for w in WORKLOADS:
        if args.only and not any(s.lower() in w.name.lower() for s in args.only):
            continue
        for backend in backends:
            results.append(run_child(backend, w.name, args))
            log(f"{w.name} on {backend}: {cell(results[-1])} {results[-1]['extra']}")
    if args.json or args.json_out:
        text = json.dumps(results, indent=2)
        if args.json_out:
            Path(args.json_out).write_text(text + "\n")
        if args.json:
            print(text)
    if not args.json:
        print_table(results, backends)


if __name__ == "__main__":
    main()
