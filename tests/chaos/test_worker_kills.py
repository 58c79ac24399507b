"""Worker processes SIGKILLed under load: tasks are retried, actors restarted, nothing is
lost and nothing happens twice where the workload can tell.

Both tests are expected to pass today.
"""

from __future__ import annotations

import collections
import random
import signal
import time
from collections.abc import Callable

import psutil
import pytest

from chaos.harness import Cluster, Driver, alive, lines, wait_for, wait_mark, workers

pytestmark = pytest.mark.chaos

KILL_INTERVAL = 0.5
TASKS = 2000
CALLS = 600


def kill_every(
    interval: float, pick: Callable[[], psutil.Process | None], until: Callable[[], bool]
) -> list[int]:
    """SIGKILL what pick() returns every interval seconds until until(); the pids killed.

    The sleep paces the faults; it synchronises nothing."""
    killed: list[int] = []
    while not until():
        victim = pick()
        if victim is not None:
            try:
                victim.send_signal(signal.SIGKILL)
                killed.append(victim.pid)
            except psutil.NoSuchProcess:
                pass
        time.sleep(interval)
    return killed


TASKS_DRIVER = """
import json, os, sys, time
import redray

url, attempts, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
redray.init(address=url)

@redray.remote
def square(i):
    with open(attempts, "a") as f:  # one write per attempt: retries show up here
        f.write(f"{i}\\n")
    time.sleep(0.004)
    return [i, i * i]

refs = [square.remote(i) for i in range(count)]
results = redray.get(refs, timeout=200)
print(json.dumps(results))
"""


@pytest.mark.timeout(150)
def test_random_worker_sigkills_lose_no_task(cluster: Cluster) -> None:
    head = cluster.start_head(num_cpus=2)
    attempts = cluster.tmp / "attempts"
    driver = cluster.driver(TASKS_DRIVER, cluster.url, str(attempts), str(TASKS))
    wait_for_first_attempt(attempts, driver)
    rng = random.Random(0)

    def any_worker() -> psutil.Process | None:
        candidates = workers(head.process)
        return rng.choice(candidates) if candidates else None

    started = time.monotonic()
    killed = kill_every(KILL_INTERVAL, any_worker, lambda: driver.process.poll() is not None)
    results = driver.result(timeout=30)
    elapsed = time.monotonic() - started

    assert results == [[i, i * i] for i in range(TASKS)]
    tries = collections.Counter(int(line) for line in lines(attempts))
    assert set(tries) == set(range(TASKS))
    assert len(killed) >= 3, f"only {len(killed)} kills in {elapsed:.1f} s: the run was too short"
    retried = sum(tries.values()) - TASKS
    assert retried >= 1, f"{len(killed)} kills but no task was ever retried"
    print(f"{TASKS} tasks, {len(killed)} workers killed, {retried} retries, {elapsed:.1f} s")


def wait_for_first_attempt(attempts, driver: Driver) -> None:
    def started() -> bool:
        driver.check_running()
        return len(lines(attempts)) > 0

    wait_for(started, 60, "no task ever started")


ACTOR_DRIVER = """
import json, os, sys, time
import redray

url, marks, effects, incarnations, count = sys.argv[1:5] + [int(sys.argv[5])]
redray.init(address=url)


@redray.remote(max_restarts=-1, max_task_retries=-1)
class Ledger:
    '''Applies each call once: its effect (a line in `effects`) is durable, and a call that
    finds its id already applied answers from the record instead of applying it again.'''

    def __init__(self, effects, incarnations):
        self.effects = effects
        self.applied = {}
        if os.path.exists(effects):
            with open(effects) as f:
                for line in f.read().split("\\n")[:-1]:
                    call_id, value = map(int, line.split())
                    self.applied[call_id] = value
        with open(incarnations, "a") as f:
            f.write(f"{os.getpid()}\\n")

    def apply(self, call_id):
        if call_id in self.applied:
            return self.applied[call_id]
        time.sleep(0.005)
        value = 3 * call_id + 1
        with open(self.effects, "a") as f:
            f.write(f"{call_id} {value}\\n")
        self.applied[call_id] = value
        return value

    def pid(self):
        return os.getpid()


ledger = Ledger.remote(effects, incarnations)
refs = [ledger.apply.remote(i) for i in range(count)]
results = redray.get(refs, timeout=200)
open(os.path.join(marks, "applied"), "w").close()
while not os.path.exists(os.path.join(marks, "stopped-killing")):
    time.sleep(0.01)
final_pid = redray.get(ledger.pid.remote(), timeout=60)
print(json.dumps({"results": results, "final_pid": final_pid}))
"""


@pytest.mark.timeout(150)
def test_actor_sigkills_restart_it_and_every_call_takes_effect_once(cluster: Cluster) -> None:
    cluster.start_head(num_cpus=2)
    marks = cluster.tmp / "marks"
    marks.mkdir()
    effects, incarnations = cluster.tmp / "effects", cluster.tmp / "incarnations"
    driver = cluster.driver(
        ACTOR_DRIVER, cluster.url, str(marks), str(effects), str(incarnations), str(CALLS)
    )
    wait_mark(incarnations, 60, driver)
    killed_pids: set[int] = set()

    def current_incarnation() -> psutil.Process | None:
        pids = lines(incarnations)
        pid = int(pids[-1]) if pids else 0
        if not pid or pid in killed_pids:
            return None  # the restart is not done yet: one kill per incarnation
        killed_pids.add(pid)
        try:
            proc = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return None
        return proc if alive(proc) else None

    killed = kill_every(
        KILL_INTERVAL,
        current_incarnation,
        lambda: (marks / "applied").exists() or driver.process.poll() is not None,
    )
    (marks / "stopped-killing").touch()
    out = driver.result(timeout=60)

    assert out["results"] == [3 * i + 1 for i in range(CALLS)]
    effect_ids = collections.Counter(int(line.split()[0]) for line in lines(effects))
    twice = sorted(i for i, n in effect_ids.items() if n > 1)
    assert not twice, f"calls applied more than once: {twice[:20]}"
    assert set(effect_ids) == set(range(CALLS))
    assert len(killed) >= 3, f"only {len(killed)} kills: the run was too short"
    pids = [int(p) for p in lines(incarnations)]
    # One restart per death: neither missed nor doubled.
    assert len(pids) == len(killed) + 1, (pids, killed)
    assert out["final_pid"] == pids[-1]
    assert pids[:-1] == killed
    print(f"{CALLS} calls, {len(killed)} actor kills, {len(pids)} incarnations")
