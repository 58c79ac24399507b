"""Task events: what owners and workers record about each task attempt, as the state API
reads it back from Redis (states, attempts, errors, times, retention, the RUNNING index)."""

from __future__ import annotations

import os
import time

import pytest
from conftest import block_until, count_lines, last_json, mark, run_driver, wait_for

import redray
from redray.util.state import get_task, list_tasks


def tasks_where(*filters, **kwargs):
    return list_tasks(filters=list(filters), detail=True, raise_on_missing_output=False, **kwargs)


def wait_tasks(predicate, *filters, timeout: float = 20.0):
    """The tasks matching filters, once predicate(tasks) holds (events reach Redis ~0.1 s
    after the fact)."""

    def found():
        tasks = tasks_where(*filters)
        return (tasks,) if predicate(tasks) else None

    return wait_for(found, timeout)[0]


@redray.remote
def square(x):
    return x * x


@redray.remote
def boom():
    raise ValueError("boom in a task")


@redray.remote
def gated(release: str, started: str) -> str:
    mark(started)
    block_until(release)
    return "released"


def test_finished_and_failed_tasks_carry_states_times_workers_and_errors(ray_start):
    assert redray.get(square.options(name="sq_ok").remote(3)) == 9
    with pytest.raises(ValueError):
        redray.get(boom.options(name="boom_fail").remote())
    (ok,) = wait_tasks(lambda ts: len(ts) == 1, ("name", "=", "sq_ok"))
    (failed,) = wait_tasks(lambda ts: len(ts) == 1, ("name", "=", "boom_fail"))
    node_id = redray.get_runtime_context().get_node_id()
    assert ok.state == "FINISHED" and ok.attempt_number == 0 and ok.type == "NORMAL_TASK"
    assert ok.node_id == node_id and ok.worker_id and ok.worker_pid
    assert ok.job_id == redray.get_runtime_context().get_job_id()
    assert ok.creation_time_ms <= ok.start_time_ms <= ok.end_time_ms
    assert ok.required_resources == {"CPU": 1.0}
    assert [e["state"] for e in ok.events][0] == "PENDING_ARGS_AVAIL"
    assert ok.events[-1]["state"] == "FINISHED"
    assert failed.state == "FAILED" and failed.error_type == "TASK_EXECUTION_EXCEPTION"
    assert "boom in a task" in failed.error_message
    brief = list_tasks(filters=[("name", "=", "sq_ok")])[0]
    assert brief.state == "FINISHED" and brief.error_message is None and brief.events is None


def test_a_running_task_is_found_by_the_running_filter_until_it_ends(ray_start, gate):
    ref = gated.options(name="gated_run").remote(gate.release_file, gate.path("started"))
    gate.wait_mark("started")
    (running,) = wait_tasks(
        lambda ts: len(ts) == 1, ("state", "=", "RUNNING"), ("name", "=", "gated_run")
    )
    assert running.start_time_ms and running.worker_pid
    assert get_task(ref).state == "RUNNING"
    gate.open()
    assert redray.get(ref) == "released"
    wait_tasks(lambda ts: not ts, ("state", "=", "RUNNING"), ("name", "=", "gated_run"))
    assert get_task(ref.task_id().hex()).state == "FINISHED"


def test_a_task_that_cannot_be_scheduled_is_pending(ray_start):
    ref = square.options(name="too_big", num_cpus=64).remote(1)
    (pending,) = wait_tasks(lambda ts: len(ts) == 1, ("name", "=", "too_big"))
    assert pending.state == "PENDING_NODE_ASSIGNMENT"
    redray.cancel(ref)
    (cancelled,) = wait_tasks(lambda ts: ts and ts[0].state == "FAILED", ("name", "=", "too_big"))
    assert cancelled.error_type == "TASK_CANCELLED"


def test_each_retry_is_an_attempt_with_its_own_state(ray_start, tmp_path):
    counter = str(tmp_path / "attempts")

    @redray.remote(max_retries=2, retry_exceptions=True)
    def flaky(path):
        with open(path, "a") as f:
            f.write("x\n")
        if count_lines(path) < 3:
            raise RuntimeError("not yet")
        return "third time"

    assert redray.get(flaky.options(name="flaky").remote(counter)) == "third time"
    attempts = wait_tasks(
        lambda ts: {t.attempt_number: t.state for t in ts}.get(2) == "FINISHED",
        ("name", "=", "flaky"),
    )
    by_attempt = {t.attempt_number: t for t in attempts}
    assert [by_attempt[n].state for n in (0, 1, 2)] == ["FAILED", "FAILED", "FINISHED"]
    assert by_attempt[0].error_type == "TASK_EXECUTION_EXCEPTION"
    assert len({t.task_id for t in attempts}) == 1
    assert get_task(attempts[0].task_id).attempt_number == 2


def test_a_killed_worker_fails_the_attempt_and_the_retry_finishes(ray_start, tmp_path):
    counter = str(tmp_path / "kills")

    @redray.remote(max_retries=1)
    def dies_once(path):
        with open(path, "a") as f:
            f.write("x\n")
        if count_lines(path) == 1:
            os.kill(os.getpid(), 9)
        return "survived"

    assert redray.get(dies_once.options(name="dies_once").remote(counter)) == "survived"
    attempts = wait_tasks(
        lambda ts: {t.attempt_number: t.state for t in ts}.get(1) == "FINISHED",
        ("name", "=", "dies_once"),
    )
    by_attempt = {t.attempt_number: t for t in attempts}
    assert by_attempt[0].state == "FAILED" and by_attempt[0].error_type == "WORKER_DIED"
    assert by_attempt[1].state == "FINISHED"


def test_cancelled_and_force_cancelled_tasks(ray_start, gate):
    ref = gated.options(name="to_cancel").remote(gate.release_file, gate.path("c1"))
    gate.wait_mark("c1")
    redray.cancel(ref)
    with pytest.raises(redray.exceptions.TaskCancelledError):
        redray.get(ref)
    forced = gated.options(name="to_kill", max_retries=0).remote(gate.release_file, gate.path("c2"))
    gate.wait_mark("c2")
    redray.cancel(forced, force=True)
    with pytest.raises(redray.exceptions.WorkerCrashedError):
        redray.get(forced)
    (cancelled,) = wait_tasks(lambda ts: ts and ts[0].state == "FAILED", ("name", "=", "to_cancel"))
    assert cancelled.error_type == "TASK_CANCELLED"
    (killed,) = wait_tasks(lambda ts: ts and ts[0].state == "FAILED", ("name", "=", "to_kill"))
    assert killed.error_type == "WORKER_DIED"


def test_actor_calls_are_recorded_with_their_actor(ray_start):
    @redray.remote
    class Tally:
        def add(self, x):
            return x + 1

    actor = Tally.remote()
    assert redray.get([actor.add.remote(i) for i in range(5)]) == [1, 2, 3, 4, 5]
    actor_id = actor._actor_id.hex()
    calls = wait_tasks(
        lambda ts: len(ts) == 5 and all(t.state == "FINISHED" for t in ts),
        ("actor_id", "=", actor_id),
    )
    assert {c.type for c in calls} == {"ACTOR_TASK"}
    assert {c.name for c in calls} == {"Tally.add"} and {c.state for c in calls} == {"FINISHED"}
    assert len({c.worker_id for c in calls}) == 1


def test_running_filter_among_ten_thousand_finished_tasks_answers_from_its_index(ray_start, gate):
    @redray.remote
    def noop():
        return None

    for _ in range(5):
        redray.get([noop.options(name="bulk").remote() for _ in range(2_000)])
    ref = gated.options(name="needle").remote(gate.release_file, gate.path("needle"))
    gate.wait_mark("needle")
    wait_tasks(lambda ts: len(ts) == 1, ("state", "=", "RUNNING"), ("name", "=", "needle"))
    wait_for(
        lambda: (
            len(
                list_tasks(
                    filters=[("name", "=", "bulk")], limit=20_000, raise_on_missing_output=False
                )
            )
            == 10_000
        ),
        30,
    )
    start = time.perf_counter()
    running = list_tasks(filters=[("state", "=", "RUNNING")], raise_on_missing_output=False)
    elapsed = time.perf_counter() - start
    assert [t.name for t in running if t.name == "needle"] == ["needle"]
    assert elapsed < 0.5, f"RUNNING filter took {elapsed:.3f} s"
    gate.open()
    redray.get(ref)


RETENTION_DRIVER = """
import json, time, warnings, redray
from redray.util.state import list_tasks
CAP = {cap!r}
redray.init(num_cpus=1)

@redray.remote
def tick(i):
    return i

for start in range(0, 1200, 300):
    refs = [tick.remote(i) for i in range(start, start + 300)]
    redray.get(refs)
last = int(refs[-1].task_id().hex()[-12:], 16)
deadline = time.time() + 20
while time.time() < deadline:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = list_tasks(limit=1000, raise_on_missing_output=False, detail=True)
    dropped = [str(w.message) for w in caught if CAP in str(w.message)]
    if len(found) == 50 and dropped and dropped[0].startswith("1150 "):
        break  # (events reach Redis a little after the tasks end)
    time.sleep(0.1)
counters = sorted(int(t.task_id[-12:], 16) for t in found)
from redray.state.api import _gcs
from redray.state import keys
with _gcs(None) as gcs:
    names = [n.decode() for n in gcs.redis.smembers(gcs.key(keys.INDEXES))]
    lists = [keys.index_key(gcs, n) for n in names if not keys.is_scored(n)]
    longest = max(keys.index_sizes(gcs, lists))
print(json.dumps({"kept": len(found), "warnings": [str(w.message) for w in caught],
                  "kept_are_the_newest": counters == list(range(last - 49, last + 1)),
                  "indexes": sorted(names), "longest_index": longest}))
"""


@pytest.mark.parametrize(
    ("setting", "cap"),
    [
        ("REDRAY_TASK_EVENTS_MAX_TASKS", "cluster's cap"),
        ("REDRAY_TASK_EVENTS_MAX_TASKS_PER_JOB", "per-job cap"),
    ],
)
def test_retention_keeps_the_newest_and_reports_what_it_dropped(setting, cap):
    driver = RETENTION_DRIVER.replace("{cap!r}", repr(cap))
    proc = run_driver(driver, env={setting: "50"}, timeout=60)
    result = last_json(proc.stdout)
    assert result["kept"] == 50 and result["kept_are_the_newest"]
    # Every list index stays within the cap: entries of dropped attempts do not pile up.
    assert {"all", "name:tick"} <= set(result["indexes"])
    assert result["longest_index"] <= 50
    (warning,) = [w for w in result["warnings"] if cap in w]
    assert int(warning.split()[0]) == 1150


DISABLED_DRIVER = """
import json, time, redray
from redray.util.state import list_tasks
redray.init(num_cpus=1)

@redray.remote
def f():
    return 1

redray.get([f.remote() for _ in range(10)])
time.sleep(0.5)
print(json.dumps({"tasks": len(list_tasks(raise_on_missing_output=False))}))
"""


def test_recording_can_be_turned_off():
    proc = run_driver(DISABLED_DRIVER, env={"REDRAY_TASK_EVENTS": "0"}, timeout=60)
    assert last_json(proc.stdout) == {"tasks": 0}
