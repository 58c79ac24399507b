"""Ray's core microbenchmark (`ray microbenchmark`), runnable on redray or on Ray.

What it measures
    Every workload of Ray's ``python/ray/_private/ray_perf.py`` with Ray's row names, loop
    sizes and multipliers (see shared/RAY_MICROBENCHMARK.md): object get/put, task
    submission (sync, batched, from many clients), actor calls (sync, async, concurrent,
    1:n, n:n, with arguments), async actors, ``wait`` on 1k refs and placement-group
    create/removal. Each row is timed with Ray's loop: a pause (``--sleep``, Ray: 10 s),
    a warm-up that calls the workload for ``--warmup`` seconds (Ray: 1 s) to pick a chunk
    size ``step = calls // 10 + 1``, then ``--trials`` trials (Ray: 4) of at least
    ``--trial`` seconds (Ray: 2 s) each; a trial's rate is ``multiplier * calls / elapsed``.
    Rows report the mean and (population) standard deviation of ops/s over the trials.

    The first row, "init seconds", is start-up cost in seconds (lower is better): a fresh
    ``python -c`` process that imports the runtime, calls ``init()`` and ``get``s one task
    result. The row's value is import + ``init()`` + first result, timed inside the
    process; the breakdown and the wall time seen from outside (interpreter start
    included, shutdown excluded) are printed below the table and kept in the JSON.

    The workloads are written once against a module object ``ray``, so the same code runs
    with ``--backend redray`` (``import redray as ray``) or ``--backend ray``. A row that
    raises (or exceeds ``--row-timeout``) is reported as an error and the run goes on.

How to run it (from the repository root)
    python scripts/microbench.py                     # redray, Ray's full durations
    python scripts/microbench.py --quick             # short smoke run
    python scripts/microbench.py --backend ray --quick
    python scripts/microbench.py --quick --vs ray    # redray vs Ray, one table
    python scripts/microbench.py --only "actor calls" --only "init" --json
    python scripts/microbench.py --list              # row names
    python scripts/microbench.py --quick --task-events-cost --only "tasks sync"

With ``--vs ray`` each backend runs in its own subprocess of this script (``--backend X
--json-out FILE``), one after the other, so the two runtimes never share a process; the
Ray side uses ``--ray-python`` (default: this interpreter), e.g. a venv that has Ray.
The ratio column is redray/Ray for ops/s rows and Ray/redray for "init seconds", so a
ratio above 1 always means redray is better.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import inspect
import json
import multiprocessing
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("redray", "ray")
INIT_ROW = "init seconds"
MEMORY_ROW = "idle 2-CPU cluster memory (RSS MB)"
PG_ROW = "placement group create/removal"
PROBE_MARKER = "@@MICROBENCH_INIT@@"

# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Timing:
    """Durations of Ray's timing loop (`timeit` in ray_microbenchmark_helpers.py)."""

    sleep: float = 10.0
    warmup: float = 1.0
    trial: float = 2.0
    trials: int = 4
    init_runs: int = 3
    row_timeout: float = 900.0


RAY_TIMING = Timing()
QUICK_TIMING = Timing(sleep=0.0, warmup=0.2, trial=0.5, trials=4, init_runs=1, row_timeout=300.0)


@dataclass
class RowResult:
    """One row of the report: ops/s (or seconds for "init seconds") or an error."""

    name: str
    unit: str = "ops/s"
    mean: float | None = None
    std: float | None = None
    trials: list[float] = field(default_factory=list)
    error: str | None = None
    extra: dict[str, float] = field(default_factory=dict)


def first_line(exc: BaseException) -> str:
    """`TypeName: first line of the message`, as reported in the table."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def error_row(name: str, message: str) -> RowResult:
    """A row that failed with `message`."""
    unit = {INIT_ROW: "s", MEMORY_ROW: "MB"}.get(name, "ops/s")
    return RowResult(name=name, unit=unit, error=message)


# --------------------------------------------------------------------------- timing loop


class ProbeError(Exception):
    """The init probe process failed; the message is already `Type: first line`."""


class RowTimeout(Exception):
    """Raised in the main thread when a row runs longer than --row-timeout."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise RowTimeout in the main thread after `seconds` (0 or no SIGALRM: no limit)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise RowTimeout(f"row exceeded --row-timeout {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def timeit(fn: Callable[[], Any], multiplier: float, timing: Timing) -> list[float]:
    """Ray's `timeit`: pause, warm up, then `trials` rates of `multiplier * calls / s`."""
    time.sleep(timing.sleep)
    start = time.perf_counter()
    count = 0
    while time.perf_counter() - start < timing.warmup:
        fn()
        count += 1
    step = count // 10 + 1
    stats = []
    for _ in range(timing.trials):
        start = time.perf_counter()
        count = 0
        while time.perf_counter() - start < timing.trial:
            for _ in range(step):
                fn()
            count += step
        end = time.perf_counter()
        stats.append(multiplier * count / (end - start))
    return stats


# --------------------------------------------------------------------------- remote code
# Each factory decorates with the chosen backend's `ray.remote`; closures capture `ray`
# (pickled by module reference) and the remote objects they call.


def make_small_value(ray: ModuleType) -> Any:
    @ray.remote
    def small_value() -> bytes:
        return b"ok"

    return small_value


def make_actor(ray: ModuleType, small_value: Any) -> Any:
    @ray.remote(num_cpus=0)
    class Actor:
        def small_value(self) -> bytes:
            return b"ok"

        def small_value_arg(self, x: Any) -> bytes:
            return b"ok"

        def small_value_batch(self, n: int) -> None:
            ray.get([small_value.remote() for _ in range(n)])

    return Actor


def make_async_actor(ray: ModuleType, small_value: Any) -> Any:
    import asyncio

    @ray.remote
    class AsyncActor:
        async def small_value(self) -> bytes:
            return b"ok"

        async def small_value_with_arg(self, x: Any) -> bytes:
            return b"ok"

        async def small_value_batch(self, n: int) -> None:
            await asyncio.wait([small_value.remote() for _ in range(n)])

    return AsyncActor


def make_client(ray: ModuleType) -> Any:
    @ray.remote(num_cpus=0)
    class Client:
        def __init__(self, servers: Any) -> None:
            if not isinstance(servers, list):
                servers = [servers]
            self.servers = servers

        def small_value_batch(self, n: int) -> None:
            results = []
            for s in self.servers:
                results.extend([s.small_value.remote() for _ in range(n)])
            ray.get(results)

        def small_value_batch_arg(self, n: int) -> None:
            x = ray.put(0)
            results = []
            for s in self.servers:
                results.extend([s.small_value_arg.remote(x) for _ in range(n)])
            ray.get(results)

    return Client


def make_do_put_small(ray: ModuleType) -> Any:
    @ray.remote
    def do_put_small() -> None:
        for _ in range(100):
            ray.put(0)

    return do_put_small


def make_do_put(ray: ModuleType) -> Any:
    @ray.remote
    def do_put() -> None:
        for _ in range(10):
            ray.put(np.zeros(10 * 1024 * 1024, dtype=np.int64))

    return do_put


def make_create_object_containing_ref(ray: ModuleType) -> Any:
    @ray.remote
    def create_object_containing_ref() -> list[Any]:
        obj_refs = []
        for _ in range(10000):
            obj_refs.append(ray.put(1))
        return obj_refs

    return create_object_containing_ref


def make_actor_work(ray: ModuleType, n: int, n_cpu: int) -> Any:
    @ray.remote
    def work(actors: list[Any]) -> None:
        ray.get([actors[i % n_cpu].small_value.remote() for i in range(n)])

    return work


class Remotes:
    """The shared remote functions and classes, decorated on first use.

    Lazy so that a backend missing one feature fails only the rows that need it.
    """

    def __init__(self, ray: ModuleType, n_cpu: int) -> None:
        self.ray = ray
        self.n_cpu = n_cpu

    @cached_property
    def small_value(self) -> Any:
        return make_small_value(self.ray)

    @cached_property
    def actor(self) -> Any:
        return make_actor(self.ray, self.small_value)

    @cached_property
    def async_actor(self) -> Any:
        return make_async_actor(self.ray, self.small_value)

    @cached_property
    def client(self) -> Any:
        return make_client(self.ray)


# --------------------------------------------------------------------------- rows
# A row's setup runs once (untimed) and returns the `fn` that `timeit` calls.

Setup = Callable[[ModuleType, Remotes], Callable[[], Any]]


@dataclass(frozen=True)
class Row:
    name: str
    multiplier: float
    setup: Setup


def setup_get_small(ray: ModuleType, r: Remotes) -> Callable[[], Any]:
    value = ray.put(0)
    return lambda: ray.get(value)


def setup_put_small(ray: ModuleType, r: Remotes) -> Callable[[], Any]:
    return lambda: ray.put(0)


def setup_put_multi_small(ray: ModuleType, r: Remotes) -> Callable[[], Any]:
    do_put_small = make_do_put_small(ray)
    return lambda: ray.get([do_put_small.remote() for _ in range(10)])


def setup_put_large(ray: ModuleType, r: Remotes) -> Callable[[], Any]:
    arr = np.zeros(100 * 1024 * 1024, dtype=np.int64)
    return lambda: ray.put(arr)


def setup_task_batch(ray: ModuleType, r: Remotes) -> Callable[[], Any]:
    small_value = r.small_value
    return lambda: ray.get([small_value.remote() for _ in range(1000)])


def setup_put_multi(ray: ModuleType, r: Remotes) -> Callable[[], Any]:
    do_put = make_do_put(ray)
    return lambda: ray.get([do_put.remote() for _ in range(10)])


def setup_get_containing_refs(ray: ModuleType, r: Remotes) -> Callable[[], Any]:
    obj_containing_ref = make_create_object_containing_ref(ray).remote()
    return lambda: ray.get(obj_containing_ref)


def wait_accepts_fetch_local(ray: ModuleType) -> bool:
    """Ray's row passes `fetch_local` (True once, then False); plain `wait` otherwise."""
    try:
        return "fetch_local" in inspect.signature(ray.wait).parameters
    except (TypeError, ValueError):
        return False


def setup_wait_refs(ray: ModuleType, r: Remotes) -> Callable[[], Any]:
    small_value = r.small_value
    use_fetch_local = wait_accepts_fetch_local(ray)

    def wait_multiple_refs() -> None:
        num_objs = 1000
        not_ready = [small_value.remote() for _ in range(num_objs)]
        fetch_local = True
        for _ in range(num_objs):
            if use_fetch_local:
                _ready, not_ready = ray.wait(not_ready, fetch_local=fetch_local)
                fetch_local = False
            else:
                _ready, not_ready = ray.wait(not_ready)

    return wait_multiple_refs


def setup_task_sync(ray: ModuleType, r: Remotes) -> Callable[[], Any]:
    small_value = r.small_value
    return lambda: ray.get(small_value.remote())


def setup_multi_client_tasks(ray: ModuleType, r: Remotes) -> Callable[[], Any]:
    actors = [r.actor.remote() for _ in range(4)]
    return lambda: ray.get([a.small_value_batch.remote(10000) for a in actors])


def calls_sync(ray: ModuleType, actor: Any) -> Callable[[], Any]:
    return lambda: ray.get(actor.small_value.remote())


def calls_async(ray: ModuleType, actor: Any) -> Callable[[], Any]:
    return lambda: ray.get([actor.small_value.remote() for _ in range(1000)])


def setup_actor_sync(ray: ModuleType, r: Remotes) -> Callable[[], Any]:
    return calls_sync(ray, r.actor.remote())


def setup_actor_async(ray: ModuleType, r: Remotes) -> Callable[[], Any]:
    return calls_async(ray, r.actor.remote())


def setup_actor_concurrent(ray: ModuleType, r: Remotes) -> Callable[[], Any]:
    return calls_async(ray, r.actor.options(max_concurrency=16).remote())


def setup_one_to_n(ray: ModuleType, r: Remotes) -> Callable[[], Any]:
    actors = [r.actor.remote() for _ in range(r.n_cpu)]
    client = r.client.remote(actors)
    return lambda: ray.get(client.small_value_batch.remote(5000))


def setup_n_to_n(ray: ModuleType, r: Remotes) -> Callable[[], Any]:
    actors = [r.actor.remote() for _ in range(r.n_cpu)]
    work = make_actor_work(ray, 5000, r.n_cpu)
    return lambda: ray.get([work.remote(actors) for _ in range(4)])


def setup_n_to_n_arg(ray: ModuleType, r: Remotes) -> Callable[[], Any]:
    actors = [r.actor.remote() for _ in range(r.n_cpu)]
    clients = [r.client.remote(a) for a in actors]
    return lambda: ray.get([c.small_value_batch_arg.remote(1000) for c in clients])


def setup_async_actor_sync(ray: ModuleType, r: Remotes) -> Callable[[], Any]:
    return calls_sync(ray, r.async_actor.remote())


def setup_async_actor_async(ray: ModuleType, r: Remotes) -> Callable[[], Any]:
    return calls_async(ray, r.async_actor.remote())


def setup_async_actor_args(ray: ModuleType, r: Remotes) -> Callable[[], Any]:
    a = r.async_actor.remote()
    return lambda: ray.get([a.small_value_with_arg.remote(i) for i in range(1000)])


def setup_async_one_to_n(ray: ModuleType, r: Remotes) -> Callable[[], Any]:
    actors = [r.async_actor.remote() for _ in range(r.n_cpu)]
    client = r.client.remote(actors)
    return lambda: ray.get(client.small_value_batch.remote(5000))


def setup_async_n_to_n(ray: ModuleType, r: Remotes) -> Callable[[], Any]:
    actors = [r.async_actor.remote() for _ in range(r.n_cpu)]
    async_actor_work = make_actor_work(ray, 5000, r.n_cpu)
    return lambda: ray.get([async_actor_work.remote(actors) for _ in range(4)])


def setup_placement_groups(ray: ModuleType, r: Remotes) -> Callable[[], Any]:
    util = ray.util

    def placement_group_create_removal() -> None:
        pgs = [util.placement_group(bundles=[{"custom": 0.001}]) for _ in range(100)]
        for pg in pgs:
            pg.wait(timeout_seconds=30)
        for pg in pgs:
            util.remove_placement_group(pg)

    return placement_group_create_removal


def main_rows(n_cpu: int) -> list[Row]:
    """The rows run after a plain `init()`, in Ray's order."""
    return [
        Row("single client get calls (Plasma Store)", 1, setup_get_small),
        Row("single client put calls (Plasma Store)", 1, setup_put_small),
        Row("multi client put calls (Plasma Store)", 1000, setup_put_multi_small),
        Row("single client put gigabytes", 8 * 0.1, setup_put_large),
        Row("single client tasks and get batch", 1, setup_task_batch),
        Row("multi client put gigabytes", 10 * 8 * 0.1, setup_put_multi),
        Row("single client get object containing 10k refs", 1, setup_get_containing_refs),
        Row("single client wait 1k refs", 1, setup_wait_refs),
        Row("single client tasks sync", 1, setup_task_sync),
        Row("single client tasks async", 1000, setup_task_batch),
        Row("multi client tasks async", 10000 * 4, setup_multi_client_tasks),
        Row("1:1 actor calls sync", 1, setup_actor_sync),
        Row("1:1 actor calls async", 1000, setup_actor_async),
        Row("1:1 actor calls concurrent", 1000, setup_actor_concurrent),
        Row("1:n actor calls async", 5000 * n_cpu, setup_one_to_n),
        Row("n:n actor calls async", 4 * 5000, setup_n_to_n),
        Row("n:n actor calls with arg async", 1000 * n_cpu, setup_n_to_n_arg),
        Row("1:1 async-actor calls sync", 1, setup_async_actor_sync),
        Row("1:1 async-actor calls async", 1000, setup_async_actor_async),
        Row("1:1 async-actor calls with args async", 1000, setup_async_actor_args),
        Row("1:n async-actor calls async", 5000 * n_cpu, setup_async_one_to_n),
        Row("n:n async-actor calls async", 4 * 5000, setup_async_n_to_n),
    ]


def sections(n_cpu: int) -> list[tuple[dict[str, Any], list[Row]]]:
    """(init kwargs, rows) pairs: each section runs in its own init/shutdown cycle."""
    pg_rows = [Row(PG_ROW, 100, setup_placement_groups)]
    return [({}, main_rows(n_cpu)), ({"resources": {"custom": 100}}, pg_rows)]


def all_row_names(n_cpu: int) -> list[str]:
    return [INIT_ROW, MEMORY_ROW] + [row.name for _, rows in sections(n_cpu) for row in rows]


def selected(name: str, only: list[str]) -> bool:
    """--only: keep rows containing any of the substrings (case-insensitive)."""
    return not only or any(s.lower() in name.lower() for s in only)


# --------------------------------------------------------------------------- init probe

PROBE_CODE = """
import json, sys, time
t0 = time.perf_counter()
try:
    import {backend} as ray
    t1 = time.perf_counter()
    ray.init()
    t2 = time.perf_counter()

    @ray.remote
    def f():
        return b"ok"

    assert ray.get(f.remote()) == b"ok"
    t3 = time.perf_counter()
    out = {{"import": t1 - t0, "init": t2 - t1, "first_task": t3 - t2, "total": t3 - t0}}
except BaseException as e:
    lines = str(e).strip().splitlines()
    out = {{"error": type(e).__name__ + (": " + lines[0] if lines else "")}}
print({marker!r} + json.dumps(out), flush=True)
if "error" not in out:
    ray.shutdown()
"""


def backend_env(backend: str) -> dict[str, str]:
    """Environment for processes running `backend`: a redray checkout is importable."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if backend == "redray" and (REPO_ROOT / "redray").is_dir():
        paths = [str(REPO_ROOT), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def run_init_probe(backend: str, timeout: float) -> dict[str, float]:
    """One fresh process: import + init() + get(f.remote()); adds the outside wall time."""
    code = PROBE_CODE.format(backend=backend, marker=PROBE_MARKER)
    with tempfile.TemporaryFile(mode="w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=backend_env(backend),
        )
        try:
            with deadline(timeout):
                result = read_probe_result(proc, start)
            proc.wait(timeout=max(timeout, 1))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if result is None:
            err.seek(0)
            tail = [line for line in err.read().splitlines() if line.strip()]
            detail = tail[-1] if tail else "no output"
            raise ProbeError(f"init probe exited {proc.returncode}: {detail}")
    if "error" in result:
        raise ProbeError(result["error"])
    return result


def read_probe_result(proc: subprocess.Popen[str], start: float) -> dict[str, Any] | None:
    """Read the probe's stdout up to its marker line (the runtime may print too)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(PROBE_MARKER):
            result = json.loads(line[len(PROBE_MARKER) :])
            result["process_wall"] = time.perf_counter() - start
            return result
    return None


def measure_init(backend: str, timing: Timing) -> RowResult:
    """The "init seconds" row: mean/std over `init_runs` fresh processes."""
    row = RowResult(name=INIT_ROW, unit="s")
    timeout = timing.row_timeout if timing.row_timeout > 0 else 600.0
    try:
        runs = [run_init_probe(backend, timeout) for _ in range(max(1, timing.init_runs))]
    except ProbeError as e:
        row.error = str(e)
        return row
    except Exception as e:
        row.error = first_line(e)
        return row
    row.trials = [run["total"] for run in runs]
    row.mean, row.std = float(np.mean(row.trials)), float(np.std(row.trials))
    keys = ("import", "init", "first_task", "process_wall")
    row.extra = {key: float(np.mean([run[key] for run in runs])) for key in keys}
    return row


MEMORY_PROBE_CODE = """
import json, os, time
import psutil
import {backend} as ray
ray.init(num_cpus=2)

@ray.remote
def f(i):
    return i

assert ray.get([f.remote(i) for i in range(20)]) == list(range(20))
time.sleep(3)  # idle: what a quiet cluster costs
procs = []
for p in psutil.Process().children(recursive=True):
    try:
        info = p.memory_full_info()
        procs.append({{"pid": p.pid, "name": " ".join(p.cmdline()[:3])[-60:],
                       "rss": info.rss, "pss": getattr(info, "pss", info.rss)}})
    except psutil.Error:
        pass
print({marker!r} + json.dumps(procs), flush=True)
ray.shutdown()
"""


def measure_memory(backend: str, timing: Timing) -> RowResult:
    """RSS of every process of a local 2-CPU cluster (not the driver), idle after 20 tasks."""
    row = RowResult(name=MEMORY_ROW, unit="MB")
    code = MEMORY_PROBE_CODE.format(backend=backend, marker=PROBE_MARKER)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=backend_env(backend),
            timeout=timing.row_timeout if timing.row_timeout > 0 else 600.0,
        )
        line = next(x for x in proc.stdout.splitlines() if x.startswith(PROBE_MARKER))
        procs = json.loads(line[len(PROBE_MARKER) :])
    except (StopIteration, subprocess.TimeoutExpired, OSError, ValueError) as e:
        row.error = f"memory probe failed: {first_line(e) if str(e) else type(e).__name__}"
        return row
    rss = sum(p["rss"] for p in procs) / 2**20
    row.mean, row.std, row.trials = rss, 0.0, [rss]
    row.extra = {
        "processes": len(procs),
        "pss_mb": sum(p["pss"] for p in procs) / 2**20,
        "largest": sorted(
            ((p["name"], round(p["rss"] / 2**20, 1)) for p in procs), key=lambda x: -x[1]
        )[:12],
    }
    return row


# --------------------------------------------------------------------------- runner


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def import_backend(backend: str) -> ModuleType:
    """Import `backend` and, if it imports, its `util` package (placement groups)."""
    if backend == "redray" and (REPO_ROOT / "redray").is_dir():
        if str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))
        os.environ.update(backend_env(backend))  # so spawned workers can import it too
    module = importlib.import_module(backend)
    try:
        importlib.import_module(f"{backend}.util")
    except ImportError as e:  # only the placement-group row needs it; it fails alone
        log(f"import {backend}.util failed: {first_line(e)}")
    return module


def run_row(ray: ModuleType, remotes: Remotes, row: Row, timing: Timing) -> RowResult:
    """Set up and time one row; any exception becomes the row's error."""
    result = RowResult(name=row.name)
    try:
        with deadline(timing.row_timeout):
            fn = row.setup(ray, remotes)
            result.trials = timeit(fn, row.multiplier, timing)
    except Exception as e:
        result.error = first_line(e)
        log(f"{row.name}: ERROR {result.error}")
        return result
    result.mean, result.std = float(np.mean(result.trials)), float(np.std(result.trials))
    log(f"{row.name} per second {result.mean:.2f} +- {result.std:.2f}")
    return result


def safe_shutdown(ray: ModuleType, quiet: bool = False) -> None:
    """shutdown(); a failure is logged (unless `quiet`) and never raised."""
    try:
        ray.shutdown()
    except Exception as e:
        if not quiet:
            log(f"shutdown() failed: {first_line(e)}")


def run_section(
    ray: ModuleType, init_kwargs: dict[str, Any], rows: list[Row], timing: Timing, n_cpu: int
) -> list[RowResult]:
    """init(**init_kwargs), run `rows`, shutdown(); a failed init fails every row."""
    try:
        with deadline(timing.row_timeout):
            ray.init(**init_kwargs)
    except Exception as e:
        message = f"init({format_kwargs(init_kwargs)}) failed: {first_line(e)}"
        log(message)
        safe_shutdown(ray, quiet=True)
        return [error_row(row.name, message) for row in rows]
    try:
        remotes = Remotes(ray, n_cpu)
        return [run_row(ray, remotes, row, timing) for row in rows]
    finally:
        safe_shutdown(ray)


def format_kwargs(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def backend_version(backend: str, ray: ModuleType | None) -> str:
    """The module's __version__, else the installed distribution's, else "?"."""
    if ray is not None and hasattr(ray, "__version__"):
        return str(ray.__version__)
    try:
        return importlib.metadata.version(backend)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def run_backend(backend: str, timing: Timing, only: list[str]) -> dict[str, Any]:
    """Run every selected row on `backend` in this process; returns the JSON report."""
    n_cpu = max(1, multiprocessing.cpu_count() // 2)
    results: list[RowResult] = []
    if selected(INIT_ROW, only):
        results.append(measure_init(backend, timing))
        log(format_init_log(results[-1]))
    if selected(MEMORY_ROW, only):
        results.append(measure_memory(backend, timing))
        memory = results[-1]
        if not memory.error:
            log(
                f"{MEMORY_ROW}: {memory.mean:.0f} MB RSS in {memory.extra['processes']} "
                f"processes (PSS {memory.extra['pss_mb']:.0f} MB); largest: "
                f"{memory.extra['largest']}"
            )
    ray: ModuleType | None = None
    todo = [(kw, [r for r in rows if selected(r.name, only)]) for kw, rows in sections(n_cpu)]
    todo = [(kw, rows) for kw, rows in todo if rows]
    if todo:
        try:
            ray = import_backend(backend)
        except Exception as e:
            message = f"import {backend} failed: {first_line(e)}"
            log(message)
            results += [error_row(row.name, message) for _, rows in todo for row in rows]
            todo = []
    for init_kwargs, rows in todo:
        assert ray is not None
        results += run_section(ray, init_kwargs, rows, timing, n_cpu)
    return report(backend, backend_version(backend, ray), timing, n_cpu, results)


def format_init_log(row: RowResult) -> str:
    if row.error:
        return f"{INIT_ROW}: ERROR {row.error}"
    return f"{INIT_ROW} {row.mean:.3f} +- {row.std:.3f} ({format_breakdown(row)})"


def report(
    backend: str, version: str, timing: Timing, n_cpu: int, rows: list[RowResult]
) -> dict[str, Any]:
    return {
        "backend": backend,
        "version": version,
        "python": platform.python_version(),
        "cpu_count": multiprocessing.cpu_count(),
        "n_cpu": n_cpu,
        "timing": asdict(timing),
        "rows": [asdict(row) for row in rows],
    }


# --------------------------------------------------------------------------- --vs mode


def child_command(python: str, backend: str, out: str, args: argparse.Namespace) -> list[str]:
    """This script, re-run for one backend with the same selection and durations."""
    cmd = [python, str(Path(__file__).resolve()), "--backend", backend, "--json-out", out]
    for flag in ("sleep", "warmup", "trial", "trials", "init_runs", "row_timeout"):
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    if args.quick:
        cmd.append("--quick")
    for pattern in args.only:
        cmd += ["--only", pattern]
    return cmd


def run_child(
    python: str, backend: str, args: argparse.Namespace, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run one backend in its own process; its stdout/stderr go to our stderr."""
    log(f"=== {backend} ({python}) {' '.join(f'{k}={v}' for k, v in (env or {}).items())} ===")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, f"{backend}.json")
        proc = subprocess.run(
            child_command(python, backend, out, args),
            stdout=sys.stderr,
            env={**backend_env(backend), **(env or {})},
            check=False,
        )
        if os.path.exists(out):
            with open(out) as f:
                return json.load(f)
    message = f"{backend} benchmark process exited with code {proc.returncode}"
    n_cpu = max(1, multiprocessing.cpu_count() // 2)
    names = [name for name in all_row_names(n_cpu) if selected(name, args.only)]
    return report(backend, "?", resolve_timing(args), n_cpu, [error_row(n, message) for n in names])


def ray_importable(python: str) -> bool:
    try:
        proc = subprocess.run([python, "-c", "import ray"], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


# --------------------------------------------------------------------------- output


def fmt_number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:,.2f}"
    return f"{value:.3f}"


def fmt_cell(row: dict[str, Any] | None, width: int = 100) -> str:
    if row is None:
        return "-"
    if row["error"]:
        text = f"ERROR {row['error']}"
        return text if len(text) <= width else text[: width - 3] + "..."
    suffix = {"s": " s", "MB": " MB"}.get(row["unit"], "")
    return f"{fmt_number(row['mean'])} ± {fmt_number(row['std'])}{suffix}"


def fmt_ratio(ours: dict[str, Any] | None, theirs: dict[str, Any] | None) -> str:
    """redray/Ray for rates, Ray/redray for seconds: > 1 means redray is better."""
    if not ours or not theirs or ours["error"] or theirs["error"]:
        return "-"
    if not ours["mean"] or not theirs["mean"]:
        return "-"
    ratio = ours["mean"] / theirs["mean"]
    lower_is_better = ours["unit"] in ("s", "MB")
    return f"{1 / ratio if lower_is_better else ratio:.2f}x"


def render_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = [" | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    for r in rows:
        tail = zip(r[1:], widths[1:], strict=True)
        cells = [r[0].ljust(widths[0])]
        cells += [c.ljust(w) if c.startswith("ERROR") else c.rjust(w) for c, w in tail]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def format_breakdown(row: RowResult | dict[str, Any]) -> str:
    extra = row.extra if isinstance(row, RowResult) else row.get("extra", {})
    if not extra:
        return ""
    return (
        f"import {extra['import']:.2f} s, init() {extra['init']:.2f} s, "
        f"first task {extra['first_task']:.2f} s; process wall from outside "
        f"{extra['process_wall']:.2f} s"
    )


def header_line(rep: dict[str, Any]) -> str:
    t = rep["timing"]
    return (
        f"{rep['backend']} {rep['version']}, Python {rep['python']}, "
        f"{rep['cpu_count']} CPUs (n_cpu={rep['n_cpu']}); sleep {t['sleep']:g} s, "
        f"warm-up {t['warmup']:g} s, {t['trials']} trials x {t['trial']:g} s"
    )


def init_notes(reports: list[dict[str, Any]]) -> list[str]:
    notes = []
    for rep in reports:
        for row in rep["rows"]:
            if row["name"] == INIT_ROW and not row["error"]:
                notes.append(f"init seconds, {rep['backend']}: {format_breakdown(row)}")
    return notes


def print_single(rep: dict[str, Any]) -> None:
    rows = [[r["name"], fmt_cell(r)] for r in rep["rows"]]
    print(header_line(rep))
    print(render_table(["row", f"{rep['backend']} ops/s"], rows))
    for note in init_notes([rep]):
        print(note)


def print_comparison(ours: dict[str, Any], theirs: dict[str, Any] | None) -> None:
    mine = {r["name"]: r for r in ours["rows"]}
    other = {r["name"]: r for r in theirs["rows"]} if theirs else {}
    names = list(mine) + [n for n in other if n not in mine]
    rows = [
        [n, fmt_cell(mine.get(n)), fmt_cell(other.get(n)), fmt_ratio(mine.get(n), other.get(n))]
        for n in names
    ]
    print(header_line(ours))
    print(header_line(theirs) if theirs else "ray: not importable, Ray column left empty")
    print(render_table(["row", "redray ops/s", "Ray ops/s", "ratio"], rows))
    print("ratio = redray/Ray (init seconds: Ray/redray); > 1 means redray is better")
    for note in init_notes([ours] + ([theirs] if theirs else [])):
        print(note)


def write_json(data: dict[str, Any], path: str) -> None:
    text = json.dumps(data, indent=2)
    if path == "-":
        print(text)
        return
    with open(path, "w") as f:
        f.write(text + "\n")


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    q = QUICK_TIMING
    p = argparse.ArgumentParser(
        description="Ray's core microbenchmark on redray or Ray.",
        epilog=f"--quick: sleep {q.sleep:g}, warm-up {q.warmup:g}, {q.trials} trials x "
        f"{q.trial:g} s, {q.init_runs} init run, row timeout {q.row_timeout:g} s",
    )
    p.add_argument("--backend", choices=BACKENDS, default="redray", help="default: redray")
    p.add_argument("--vs", choices=["ray"], help="run redray and Ray, print one table")
    p.add_argument(
        "--ray-python", default=sys.executable, help="interpreter for the Ray side of --vs"
    )
    p.add_argument(
        "--task-events-cost",
        action="store_true",
        help="run redray with task events on and off (in pairs of runs), one table",
    )
    p.add_argument("--pairs", type=int, default=4, help="--task-events-cost: pairs of runs (4)")
    p.add_argument("--quick", action="store_true", help="short durations for a smoke run")
    p.add_argument("--sleep", type=float, help="pause before each row (Ray: 10 s)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per row (Ray: 1)")
    p.add_argument("--trial", type=float, help="seconds per trial (Ray: 2)")
    p.add_argument("--trials", type=int, help="trials per row (Ray: 4)")
    p.add_argument("--init-runs", type=int, help="fresh processes for 'init seconds' (3)")
    p.add_argument(
        "--row-timeout", type=float, help="fail a row after this many seconds (900; 0: never)"
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="SUBSTRING",
        help="run rows containing SUBSTRING (case-insensitive; repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print JSON results instead of a table")
    p.add_argument("--json-out", metavar="PATH", help="also write JSON results to PATH")
    p.add_argument("--list", action="store_true", help="print the row names and exit")
    return p.parse_args(argv)


def resolve_timing(args: argparse.Namespace) -> Timing:
    """Explicit options win over --quick, which wins over Ray's durations."""
    base = QUICK_TIMING if args.quick else RAY_TIMING
    overrides = {
        name: getattr(args, name)
        for name in ("sleep", "warmup", "trial", "trials", "init_runs", "row_timeout")
        if getattr(args, name) is not None
    }
    return Timing(**{**asdict(base), **overrides})


def main_vs(args: argparse.Namespace) -> None:
    ours = run_child(sys.executable, "redray", args)
    theirs = None
    if ray_importable(args.ray_python):
        theirs = run_child(args.ray_python, "ray", args)
    else:
        log(f"ray is not importable with {args.ray_python}; skipping the Ray side")
    if args.json or args.json_out:
        write_json({"redray": ours, "ray": theirs}, args.json_out or "-")
    if not args.json:
        print_comparison(ours, theirs)


def main_task_events_cost(args: argparse.Namespace) -> None:
    """The cost of recording task events: each row with REDRAY_TASK_EVENTS=1 and =0, in
    fresh processes, `--pairs` pairs of runs in turn (on off, off on, on off, ...). Each
    pair gives a ratio per row; the median of those is the figure (pairing keeps it
    meaningful when the machine's speed drifts; the median keeps one disturbed pair from
    moving it). The means of all runs of each side are shown beside it."""
    runs: dict[str, list[dict[str, Any]]] = {"1": [], "0": []}
    for pair in range(args.pairs):
        for setting in ("1", "0") if pair % 2 == 0 else ("0", "1"):
            runs[setting].append(
                run_child(sys.executable, "redray", args, {"REDRAY_TASK_EVENTS": setting})
            )

    def rows_of(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {row["name"]: row for row in report["rows"]}

    def pooled(reports: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        merged: dict[str, dict[str, Any]] = {}
        for rep in reports:
            for name, row in rows_of(rep).items():
                if row["error"] or name in merged and merged[name]["error"]:
                    merged[name] = row
                elif name not in merged:
                    merged[name] = {**row, "_means": [row["mean"]]}
                else:
                    merged[name]["_means"].append(row["mean"])
        for row in merged.values():
            means = row.pop("_means", None)
            if means:
                row["mean"] = statistics.fmean(means)
                row["std"] = statistics.pstdev(means)
        return merged

    def paired(name: str) -> str:
        ratios = []
        for on_run, off_run in zip(runs["1"], runs["0"], strict=True):
            on_row, off_row = rows_of(on_run).get(name), rows_of(off_run).get(name)
            if on_row and off_row and not on_row["error"] and not off_row["error"]:
                if off_row["mean"]:
                    ratios.append(on_row["mean"] / off_row["mean"])
        if not ratios:
            return "-"
        spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
        return f"{statistics.median(ratios):.2f}x{spread}"

    on, off = pooled(runs["1"]), pooled(runs["0"])
    table = [[name, fmt_cell(on[name]), fmt_cell(off.get(name)), paired(name)] for name in on]
    print(header_line(runs["1"][0]))
    print(render_table(["row", "events on", "events off", "on/off"], table))
    print(
        f"on/off: ops/s with task events recorded over ops/s without (1.00x: no cost), the "
        f"median of {args.pairs} pairs of runs (lowest-highest)"
    )
    if args.json or args.json_out:
        write_json({"on": runs["1"], "off": runs["0"]}, args.json_out or "-")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.task_events_cost:
        main_task_events_cost(args)
        return
    if args.list:
        print("\n".join(all_row_names(max(1, multiprocessing.cpu_count() // 2))))
        return
    if args.vs:
        main_vs(args)
        return
    rep = run_backend(args.backend, resolve_timing(args), args.only)
    if args.json or args.json_out:
        write_json(rep, args.json_out or "-")
    if not args.json:
        print_single(rep)


if __name__ == "__main__":
    main()
