"""User metrics (`redray.util.metrics`): Ray's signatures and checks, values aggregated per
process and readable cluster-wide with `read_metrics`, gone when their process is."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner
from conftest import wait_for

import redray
from redray.cli import cli
from redray.core import context
from redray.state.metrics import read_metrics
from redray.util.metrics import Counter, Gauge, Histogram


@pytest.fixture(scope="module")
def fast_metrics():
    os.environ["REDRAY_METRICS_REPORT_INTERVAL_MS"] = "100"  # inherited by the workers
    redray.init(num_cpus=2)
    yield context.current.gcs
    redray.shutdown()
    os.environ.pop("REDRAY_METRICS_REPORT_INTERVAL_MS")


def metric(gcs, name: str, **labels: str) -> list[dict]:
    return [
        m
        for m in read_metrics(gcs)
        if m["name"] == name and all(m["labels"].get(k) == v for k, v in labels.items())
    ]


def test_definitions_are_checked_as_ray_does():
    with pytest.raises(ValueError, match="Empty name"):
        Counter("")
    with pytest.raises(TypeError, match="tuple"):
        Counter("tags_as_list", tag_keys=["a"])
    with pytest.raises(ValueError, match="boundaries"):
        Histogram("no_buckets")
    with pytest.raises(ValueError, match="greater than 0"):
        Histogram("bad_buckets", boundaries=[0, 1])
    counter = Counter("checked_counter", tag_keys=("route",))
    with pytest.raises(ValueError, match=">0"):
        counter.inc(0, tags={"route": "/"})
    with pytest.raises(ValueError, match="Missing value for tag key"):
        counter.inc(1)
    with pytest.raises(ValueError, match="Unrecognized tag key"):
        counter.inc(1, tags={"route": "/", "verb": "GET"})
    assert counter.set_default_tags({"route": "/home"}) is counter
    counter.inc(1)  # the default tag fills in
    with pytest.raises(ValueError, match="already defined"):
        Gauge("checked_counter")


def test_metrics_from_tasks_actors_and_the_driver_are_read_back(fast_metrics):
    gcs = fast_metrics

    @redray.remote
    def handle(n):
        requests = Counter("app_requests", "requests handled", tag_keys=("route",))
        for _ in range(n):
            requests.inc(tags={"route": "/api"})
        return os.getpid()

    @redray.remote
    class Queue:
        def __init__(self):
            self.depth = Gauge("app_queue_depth", "items waiting", tag_keys=("queue",))
            self.depth.set_default_tags({"queue": "main"})

        def set(self, n):
            self.depth.set(n)
            return os.getpid()

    pids = set(redray.get([handle.remote(5) for _ in range(4)]))
    queue = Queue.remote()
    actor_pid = redray.get(queue.set.remote(7))
    latency = Histogram("app_latency_s", "latency", boundaries=[0.1, 1.0])
    for value in (0.05, 0.5, 2.0, 0.5):
        latency.observe(value)

    def requests_total():
        found = metric(gcs, "app_requests")
        return sum(s["value"] for m in found for s in m["series"]) == 20 and found

    found = wait_for(requests_total, 15)
    assert {int(m["labels"]["pid"]) for m in found} == pids
    assert found[0]["type"] == "counter" and found[0]["series"][0]["tags"] == {"route": "/api"}
    assert found[0]["labels"]["NodeId"] == redray.get_runtime_context().get_node_id()
    (depth,) = wait_for(lambda: metric(gcs, "app_queue_depth", pid=str(actor_pid)), 15)
    assert depth["series"] == [{"tags": {"queue": "main"}, "value": 7.0}]
    (hist,) = wait_for(lambda: metric(gcs, "app_latency_s", Component="driver"), 15)
    assert hist["boundaries"] == [0.1, 1.0]
    assert hist["series"][0]["buckets"] == [1, 2, 1]
    assert hist["series"][0]["count"] == 4 and hist["series"][0]["sum"] == pytest.approx(3.05)

    redray.kill(queue)
    wait_for(lambda: not metric(gcs, "app_queue_depth", pid=str(actor_pid)), 15)


def test_redray_list_metrics(fast_metrics):
    Gauge("cli_gauge").set(42)
    wait_for(lambda: metric(fast_metrics, "cli_gauge"), 15)
    result = CliRunner().invoke(
        cli,
        [
            "list",
            "metrics",
            "-f",
            "name=cli_gauge",
            "--format",
            "json",
            "--address",
            fast_metrics.url,
        ],
    )
    assert result.exit_code == 0, result.output
    assert '"value": 42.0' in result.output
