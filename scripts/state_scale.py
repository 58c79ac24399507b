"""The state API on a big task history: how long a RUNNING filter takes among many finished
tasks (the issue Ray users hit: a RUNNING filter returning nothing on a big job, ~5 s each).

Runs --tasks finished tasks (default 100,000) on a private cluster, starts a few tasks that
stay running, waits until every task is stored, then times `list_tasks` with a RUNNING
filter, with a name filter, without filters, and `redray list tasks -f state=RUNNING`.

    python scripts/state_scale.py [--tasks 100000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redray
from redray.core import context
from redray.util.state import list_tasks

REPO = Path(__file__).resolve().parent.parent


@redray.remote
def noop() -> None:
    return None


@redray.remote
def hold(release: str) -> None:
    while not os.path.exists(release):
        time.sleep(0.01)


def timed(label: str, fn) -> object:
    start = time.perf_counter()
    result = fn()
    print(f"{label:<48} {time.perf_counter() - start:8.3f} s  ({len(result)} rows)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    args = parser.parse_args()
    for setting in ("REDRAY_TASK_EVENTS_MAX_TASKS", "REDRAY_TASK_EVENTS_MAX_TASKS_PER_JOB"):
        os.environ.setdefault(setting, str(args.tasks + 1000))  # keep them all
    redray.init(num_cpus=2)
    start = time.perf_counter()
    for done in range(0, args.tasks, 10_000):
        redray.get([noop.remote() for _ in range(min(10_000, args.tasks - done))])
    print(f"{args.tasks} tasks ran in {time.perf_counter() - start:.1f} s")
    release = os.path.join(tempfile.mkdtemp(), "release")
    held = [hold.remote(release) for _ in range(2)]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        stored = list_tasks(
            filters=[("name", "=", "noop")], limit=args.tasks + 10, raise_on_missing_output=False
        )
        running = list_tasks(filters=[("state", "=", "RUNNING")], raise_on_missing_output=False)
        if len(stored) >= args.tasks and len(running) == 2:
            break
        time.sleep(0.5)
    print(f"stored: {len(stored)} finished, {len(running)} running")
    timed("list_tasks(state=RUNNING)", lambda: list_tasks(filters=[("state", "=", "RUNNING")]))
    timed(
        "list_tasks(name=hold, state=RUNNING)",
        lambda: list_tasks(filters=[("name", "=", "hold"), ("state", "=", "RUNNING")]),
    )
    timed("list_tasks() (newest 100)", lambda: list_tasks(raise_on_missing_output=False))
    timed(
        "list_tasks(state=FINISHED, limit=1000)",
        lambda: list_tasks(
            filters=[("state", "=", "FINISHED")], limit=1000, raise_on_missing_output=False
        ),
    )
    url = context.current.gcs.url
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "redray.cli",
            "list",
            "tasks",
            "-f",
            "state=RUNNING",
            "--address",
            url,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    print(
        f"{'redray list tasks -f state=RUNNING (whole command)':<48} {time.perf_counter() - start:8.3f} s"
    )
    print(out.splitlines()[1] if len(out.splitlines()) > 1 else out)
    open(release, "w").close()
    redray.get(held)
    redray.shutdown()


if __name__ == "__main__":
    main()
