"""Prometheus metrics with a real cluster: the dashboard's /metrics (the whole cluster) and a
node's exporter (that node only), parsed with prometheus_client's own parser and compared
with the state API; user metrics under the names Ray exports them with; `redray start`
serving both until `redray stop`."""

from __future__ import annotations

import json
import os
import re
import urllib.request
from collections import Counter as Tally
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import REPO, wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_cli import redray_cli

import redray
from redray.core import context
from redray.util import state
from redray.util.metrics import Counter, Gauge, Histogram
from redray.util.placement_group import placement_group

pytestmark = pytest.mark.timeout(120)


@redray.remote
def work(x: int) -> int:
    Counter("export_requests", "requests served", tag_keys=("route",)).inc(
        2, tags={"route": "/work"}
    )
    return x


@redray.remote(max_retries=0)
def fail() -> None:
    raise RuntimeError("no")


@redray.remote
class Holder:
    def ping(self) -> int:
        return 1


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[str, list]:
    """{family name: samples} of a /metrics page, parsed as Prometheus would."""
    request = urllib.request.Request(url + "/metrics", headers=headers or {})
    with urllib.request.urlopen(request, timeout=20) as response:
        text = response.read().decode()
    families: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        families.setdefault(family.name, []).extend(family.samples)
    return families


def samples(families: dict[str, list], name: str, **labels: str) -> list[Any]:
    return [
        s
        for family in families.values()
        for s in family
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


@pytest.fixture(scope="module")
def cluster():
    os.environ["REDRAY_METRICS_REPORT_INTERVAL_MS"] = "100"  # (inherited by the workers)
    ctx = redray.init(num_cpus=2, include_dashboard=True, dashboard_port=0, _metrics_export_port=0)
    try:
        holders = [Holder.remote() for _ in range(2)]
        redray.get([h.ping.remote() for h in holders])
        redray.kill(holders[1])
        redray.get([work.remote(i) for i in range(4)])
        with pytest.raises(RuntimeError):
            redray.get(fail.remote())
        group = placement_group([{"CPU": 0.1}])
        redray.get(group.ready())
        Gauge("export_queue_depth", "items waiting").set(7)
        Histogram("export_latency_s", "latency", boundaries=[0.1, 1.0]).observe(0.5)
        keep = redray.put(b"x" * (2 << 20))  # a store object for the store gauges
        wait_for(
            lambda: (
                len(state.list_tasks(filters=[("name", "=", "work")])) == 4
                and state.list_tasks(filters=[("state", "=", "FAILED")])
                and state.list_actors(filters=[("state", "=", "DEAD")])
            ),
            timeout=20,
        )
        worker = context.current
        yield {
            "url": "http://" + ctx.dashboard_url,
            "node_id": worker.node_id,
            "exporter": redray.api._private_dashboard[1].url,
            "keep": keep,
        }
    finally:
        redray.shutdown()
        os.environ.pop("REDRAY_METRICS_REPORT_INTERVAL_MS")


def test_counts_match_the_state_api(cluster):
    families = scrape(cluster["url"])
    tasks = Tally()
    for sample in samples(families, "ray_tasks"):
        tasks[(sample.labels["Name"], sample.labels["State"])] += sample.value
        assert sample.labels["IsRetry"] == "0"
    expected = Tally()
    for name, entry in state.summarize_tasks()["cluster"]["summary"].items():
        for task_state, count in entry["state_counts"].items():
            expected[(name, task_state)] += count
    assert tasks == expected
    assert tasks[("work", "FINISHED")] == 4 and tasks[("fail", "FAILED")] == 1

    actors = Tally()
    for sample in samples(families, "ray_actors", Source="gcs"):
        actors[(sample.labels["Name"], sample.labels["State"])] += sample.value
    assert actors == Tally((a.class_name, a.state) for a in state.list_actors())
    assert actors[("Holder", "DEAD")] == 1

    groups = {s.labels["State"]: s.value for s in samples(families, "ray_placement_groups")}
    assert groups == dict(Tally(g.state for g in state.list_placement_groups()))

    (node,) = state.list_nodes()
    cpu = {
        s.labels["State"]: s.value
        for s in samples(families, "ray_resources", Name="CPU", NodeId=node.node_id)
    }
    assert cpu["USED"] + cpu["AVAILABLE"] == node.resources_total["CPU"] == 2.0
    assert samples(families, "ray_node_cpu_utilization", NodeId=node.node_id, RayNodeType="head")
    (mem,) = samples(families, "ray_node_mem_total", NodeId=node.node_id)
    assert mem.value == psutil.virtual_memory().total
    wait_for(
        lambda: (
            samples(scrape(cluster["url"]), "ray_object_store_memory", Location="MMAP_SHM")[0].value
            >= 2 << 20
        ),
        timeout=10,
        message="the store's use never reached the metrics",
    )
    assert samples(families, "redray_nodes", State="ALIVE")[0].value == 1
    assert samples(families, "redray_task_events_dropped_total", Reason="retention")
    (stored,) = samples(families, "ray_gcs_task_manager_task_events_stored")
    assert stored.value == sum(expected.values())


def test_user_metrics_have_rays_names(cluster):
    def read() -> dict[str, list]:
        families = scrape(cluster["url"])
        found = samples(families, "ray_export_requests_total", route="/work")
        # (the driver's gauge and histogram are flushed by the driver, on its own schedule)
        driver_flushed = samples(families, "ray_export_queue_depth") and samples(
            families, "ray_export_latency_s_count"
        )
        return families if sum(s.value for s in found) == 8 and driver_flushed else None

    families = wait_for(
        read, timeout=10, message="the tasks' counter never summed to 8, or the driver's never came"
    )
    (sample, *_) = samples(families, "ray_export_requests_total")
    assert sample.labels["Component"] == "core_worker"
    assert sample.labels["NodeAddress"] == "127.0.0.1"
    assert sample.labels["WorkerId"] and "JobId" in sample.labels
    # Ray 2.60 also exports a counter as a gauge of its bare name (deprecated)
    assert sum(s.value for s in samples(families, "ray_export_requests")) == 8
    (gauge,) = samples(families, "ray_export_queue_depth")
    assert gauge.value == 7 and gauge.labels["Component"] == "driver"
    buckets = {s.labels["le"]: s.value for s in samples(families, "ray_export_latency_s_bucket")}
    assert buckets == {"0.1": 0, "1.0": 1, "+Inf": 1}
    assert samples(families, "ray_export_latency_s_count")[0].value == 1
    assert samples(families, "ray_export_latency_s_sum")[0].value == 0.5


def test_a_nodes_exporter_serves_that_node_only(cluster):
    families = wait_for(
        lambda: (f := scrape(cluster["exporter"])) and samples(f, "ray_export_queue_depth") and f,
        timeout=10,
    )
    node_ids = {
        s.labels["NodeId"] for family in families.values() for s in family if "NodeId" in s.labels
    }
    assert node_ids == {cluster["node_id"]}
    assert samples(families, "ray_resources", Name="CPU", State="AVAILABLE")
    assert samples(families, "ray_node_cpu_utilization")
    # the cluster's tables are the dashboard's to export, once
    assert not samples(families, "ray_tasks") and not samples(families, "ray_actors")


@pytest.mark.timeout(90)
def test_redray_start_serves_the_dashboard_and_node_metrics_until_stop(tmp_path: Path):
    started = redray_cli(
        "start",
        "--head",
        "--port",
        "0",
        "--num-cpus",
        "1",
        "--object-store-memory",
        str(64 << 20),
        "--dashboard-port",
        "0",
        "--metrics-export-port",
        "0",
        tmpdir=tmp_path,
    )
    try:
        dashboard = re.search(r"Dashboard: (http://\S+) \(pid (\d+)\)", started.stdout)
        exporter = re.search(
            r"This node's metrics: (http://\S+)/metrics \(pid (\d+)\)", started.stdout
        )
        assert dashboard and exporter, started.stdout
        families = scrape(dashboard.group(1))
        assert samples(families, "redray_nodes", State="ALIVE")[0].value == 1
        wait_for(lambda: samples(scrape(exporter.group(1)), "ray_node_mem_total"), timeout=10)
        with urllib.request.urlopen(dashboard.group(1) + "/api/overview", timeout=20) as page:
            assert b'"state":"ALIVE"' in page.read()
        pids = [int(dashboard.group(2)), int(exporter.group(2))]
        gcs_url = re.search(r"^\s+(redis://\S+)$", started.stdout, re.M).group(1)
        joined = redray_cli(
            "node",
            "--redis",
            gcs_url,
            "--num-cpus",
            "1",
            "--object-store-memory",
            str(64 << 20),
            "--metrics-export-port",
            "0",
            tmpdir=tmp_path,
        )
        node_exporter = re.search(
            r"This node's metrics: (http://\S+)/metrics \(pid (\d+)\)", joined.stdout
        )
        node_id = re.search(r"Node (\w+) joined", joined.stdout).group(1)
        pids.append(int(node_exporter.group(2)))
        wait_for(
            lambda: (
                {
                    s.labels["NodeId"]
                    for s in samples(scrape(node_exporter.group(1)), "ray_node_mem_total")
                }
                == {node_id}
            ),
            timeout=10,
            message="the joined node's exporter never served its own node's metrics",
        )
        token = redray_cli("dashboard-token", tmpdir=tmp_path).stdout.strip()
        assert re.fullmatch(r"[0-9a-f]{64}", token)
    finally:
        stopped = redray_cli("stop", tmpdir=tmp_path)
    assert "Stopped 2 redray node(s)" in stopped.stdout
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_the_shipped_grafana_dashboard_queries_exported_metrics(cluster):
    dashboard = json.loads((REPO / "docs" / "grafana_dashboard.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b((?:ray|redray)_[a-z_]+)\{", target["expr"])
    }
    exported = {s.name for family in scrape(cluster["url"]).values() for s in family}
    assert queried and queried <= exported, queried - exported
