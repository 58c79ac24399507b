"""`redray list/get/summary/logs/timeline` against a live cluster: output formats, filters,
errors, logs and the timeline file."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from conftest import wait_for

import redray
from redray.cli import cli
from redray.core import context


@redray.remote
def shout(word):
    print(f"shouting {word}", flush=True)
    return word.upper()


@redray.remote
def fail_loudly():
    raise KeyError("no such key")


@redray.remote
class Keeper:
    def ping(self):
        print("keeper ping", flush=True)
        return "pong"


@pytest.fixture(scope="module")
def cluster():
    redray.init(num_cpus=2)
    keeper = Keeper.options(name="keeper").remote()
    assert redray.get(keeper.ping.remote()) == "pong"
    assert redray.get([shout.remote(w) for w in ("a", "b", "c")]) == ["A", "B", "C"]
    with pytest.raises(KeyError):
        redray.get(fail_loudly.remote())
    url = context.current.gcs.url
    yield {"url": url, "keeper": keeper}
    redray.shutdown()


def run(cluster, *args: str, ok: bool = True):
    result = CliRunner().invoke(cli, [*args, "--address", cluster["url"]])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def json_of(cluster, *args: str):
    return json.loads(run(cluster, *args, "--format", "json").stdout)


def test_list_tasks_in_every_format_with_filters(cluster):
    wait_for(lambda: len(json_of(cluster, "list", "tasks", "-f", "name=shout")) == 3)
    rows = json_of(cluster, "list", "tasks", "-f", "name=shout", "-f", "state=FINISHED")
    assert {r["state"] for r in rows} == {"FINISHED"} and "events" not in rows[0]
    failed = json_of(cluster, "list", "tasks", "-f", "state!=FINISHED", "--detail")
    assert [r["error_type"] for r in failed if r["name"] == "fail_loudly"] == [
        "TASK_EXECUTION_EXCEPTION"
    ]
    assert "events" in failed[0]
    as_yaml = yaml.safe_load(
        run(cluster, "list", "tasks", "-f", "name=shout", "--format", "yaml").stdout
    )
    assert len(as_yaml) == 3
    table = run(cluster, "list", "tasks", "-f", "name=shout", "--format", "table").stdout
    assert table.splitlines()[0].split()[:3] == ["TASK_ID", "ATTEMPT_NUMBER", "NAME"]
    assert len(table.splitlines()) == 4
    default = run(cluster, "list", "tasks", "-f", "name=shout").stdout
    assert "======== List: tasks ========" in default and "Total: 3" in default
    limited = run(cluster, "list", "tasks", "-f", "name=shout", "--limit", "1", "--format", "json")
    assert len(json.loads(limited.stdout)) == 1
    assert "showing 1 of 3" in limited.stderr


def test_list_every_resource(cluster):
    assert json_of(cluster, "list", "actors", "-f", "name=keeper")[0]["state"] == "ALIVE"
    assert json_of(cluster, "list", "nodes")[0]["state"] == "ALIVE"
    assert json_of(cluster, "list", "jobs")[0]["status"] == "RUNNING"
    assert json_of(cluster, "list", "placement-groups") == []
    workers = json_of(cluster, "list", "workers", "-f", "worker_type=DRIVER")
    assert len(workers) == 1
    objects = json_of(cluster, "list", "objects", "-f", "reference_type=ACTOR_HANDLE")
    assert objects[0]["object_id"] == cluster["keeper"]._actor_id.hex()


def test_get_and_summary(cluster):
    actor_id = cluster["keeper"]._actor_id.hex()
    got = yaml.safe_load(run(cluster, "get", "actors", actor_id).stdout)
    assert got["actor_id"] == actor_id and "required_resources" in got
    missing = run(cluster, "get", "actors", "ab" * 16, ok=False)
    assert missing.exit_code == 1 and "No actor" in missing.output
    summary = json_of(cluster, "summary", "tasks")
    assert summary["summary"]["shout"]["state_counts"] == {"FINISHED": 3}
    assert "Actors Summary" in run(cluster, "summary", "actors").stdout
    assert json_of(cluster, "summary", "objects")["total_objects"] >= 1


def test_bad_input_is_a_one_line_error(cluster):
    result = run(cluster, "list", "tasks", "-f", "colour=red", ok=False)
    assert result.exit_code == 1 and "not supported" in result.output
    result = run(cluster, "list", "tasks", "-f", "state", ok=False)
    assert result.exit_code == 2 and "key=value" in result.output
    result = CliRunner().invoke(cli, ["list", "tasks", "--address", "redis://127.0.0.1:1"])
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_logs_list_print_and_by_actor(cluster):
    listing = run(cluster, "logs").stdout
    assert "raylet.log" in listing and "worker_out:" in listing
    assert (
        "keeper ping"
        in run(cluster, "logs", "actor", "--id", cluster["keeper"]._actor_id.hex()).stdout
    )
    raylet = run(cluster, "logs", "raylet.log", "--tail", "1").stdout
    assert raylet.count("\n") == 1
    task = json_of(cluster, "list", "tasks", "-f", "name=shout", "--limit", "1")[0]
    assert "shouting" in run(cluster, "logs", "task", "--id", task["task_id"]).stdout
    no_id = run(cluster, "logs", "actor", ok=False)
    assert no_id.exit_code == 2


def test_timeline_file_has_one_slice_per_task(cluster, tmp_path):
    out = tmp_path / "trace.json"
    result = run(cluster, "timeline", "--output", str(out))
    trace = json.loads(out.read_text())
    slices = [e for e in trace if e["ph"] == "X"]
    tasks = json_of(cluster, "list", "tasks", "--limit", "1000")
    assert len(slices) == len([t for t in tasks if t["state"] != "PENDING_ARGS_AVAIL"])
    assert f"Wrote {len(slices)} task slices" in result.stdout
    rows = {(e["pid"], e["tid"]) for e in slices}
    names = {(e["pid"], e["tid"]) for e in trace if e["ph"] == "M" and e["name"] == "thread_name"}
    assert rows <= names  # every slice sits on a named worker row
    assert all(e["dur"] >= 0 and e["ts"] > 0 for e in slices)


def test_redray_timeline_writes_chrome_trace(cluster, tmp_path):
    path = tmp_path / "api-trace.json"
    redray.timeline(str(path))
    trace = json.loads(path.read_text())
    assert {e["name"] for e in trace if e["ph"] == "X"} >= {"shout", "Keeper.ping"}
    assert isinstance(redray.timeline(), list)
