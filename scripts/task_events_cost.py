"""What recording task events costs: CPU time per task or actor call, events on and off.

Each setting runs in a fresh driver process with a private one-CPU cluster
(REDRAY_TASK_EVENTS=1 / 0), in the order on, off, off, on. For each workload the script
counts the CPU seconds of the driver and every process of its cluster (raylet, workers,
fork server, redis-server), including what the raylet writes to Redis after the loop ends,
and the wall time. CPU time per call is robust on a busy machine where ops/s are not (see
scripts/microbench.py --task-events-cost for the ops/s rows).

    python scripts/task_events_cost.py [--calls 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
import psutil
import redray

redray.init(num_cpus=1)
me = psutil.Process()

def cpu_by_role():
    roles = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            role = "driver" if proc.pid == me.pid else proc.name()
            if role == "python" and proc.ppid() != me.pid:
                role = "workers"
            elif role == "python":
                role = "raylet"
            roles[role] = roles.get(role, 0.0) + t.user + t.system
        except psutil.Error:
            pass
    return roles

def cpu():
    return sum(cpu_by_role().values())

@redray.remote
def small():
    return b"ok"

@redray.remote
class Actor:
    def small(self):
        return b"ok"

actor = Actor.remote()
redray.get(actor.small.remote())
redray.get([small.remote() for _ in range(500)])
n = int(sys.argv[1])
workloads = {
    "tasks sync": lambda: [redray.get(small.remote()) for _ in range(n)],
    "tasks async": lambda: redray.get([small.remote() for _ in range(n)]),
    "actor calls sync": lambda: [redray.get(actor.small.remote()) for _ in range(n)],
    "actor calls async": lambda: redray.get([actor.small.remote() for _ in range(n)]),
}
out = {}
for name, run in workloads.items():
    time.sleep(0.5)
    roles0, wall0 = cpu_by_role(), time.perf_counter()
    run()
    wall = time.perf_counter() - wall0
    time.sleep(0.5)  # what the raylet writes after the loop counts too (both settings idle alike)
    roles1 = cpu_by_role()
    by_role = {k: (roles1[k] - roles0.get(k, 0.0)) / n * 1e6 for k in roles1}
    out[name] = {"cpu_us_per_call": sum(by_role.values()), "calls_per_s": n / wall, "by_role": by_role}
print(json.dumps(out))
redray.shutdown()
"""


def run(setting: str, calls: int) -> dict:
    env = dict(os.environ, REDRAY_TASK_EVENTS=setting, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(calls)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"1": [], "0": []}
    for setting in ("1", "0", "0", "1"):
        runs[setting].append(run(setting, args.calls))
    print(f"{args.calls} calls per workload; CPU of driver + cluster, mean of 2 runs each")
    print(
        f"{'workload':<18} {'CPU us/call on':>15} {'off':>8} {'on/off':>7}   {'calls/s on':>10} {'off':>8}"
    )
    for name in runs["1"][0]:
        on = [r[name] for r in runs["1"]]
        off = [r[name] for r in runs["0"]]
        cpu_on = sum(r["cpu_us_per_call"] for r in on) / len(on)
        cpu_off = sum(r["cpu_us_per_call"] for r in off) / len(off)
        rate_on = sum(r["calls_per_s"] for r in on) / len(on)
        rate_off = sum(r["calls_per_s"] for r in off) / len(off)
        print(
            f"{name:<18} {cpu_on:>15.1f} {cpu_off:>8.1f} {cpu_on / cpu_off:>7.2f}   "
            f"{rate_on:>10,.0f} {rate_off:>8,.0f}"
        )
    for name in runs["1"][0]:
        for setting, label in (("1", "on"), ("0", "off")):
            roles = {}
            for r in runs[setting]:
                for role, value in r[name]["by_role"].items():
                    roles[role] = roles.get(role, 0.0) + value / len(runs[setting])
            detail = ", ".join(f"{k} {v:.1f}" for k, v in sorted(roles.items()))
            print(f"  {name} ({label}): CPU us/call by process: {detail}")
    print(time.strftime("measured %Y-%m-%d %H:%M UTC", time.gmtime()))


if __name__ == "__main__":
    main()
