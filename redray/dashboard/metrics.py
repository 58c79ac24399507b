"""The Prometheus collector: reads the cluster's state on each scrape, under Ray's metric
names (`ray_tasks`, `ray_actors`, `ray_resources`, `ray_object_store_memory`,
`ray_placement_groups`, `ray_node_*`, the user metrics as `ray_<name>`), plus redray's own
(`redray_*`). Nothing is kept between scrapes.

Scope: the dashboard's collector (node_id None) serves the whole cluster; a node exporter's
serves what is measured on its node (its resources, store, host and its processes' user
metrics), so each series comes from one target whichever way Prometheus is set up.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from redray.gcs import Gcs
from redray.state import cluster, keys, tasks
from redray.state.metrics import read_metrics

NODE_LABELS = ["ip", "NodeId", "SessionName", "IsHeadNode", "RayNodeType"]
USER_LABELS = ["Component", "JobId", "NodeAddress", "WorkerId", "SessionName"]


class ClusterCollector:
    """A prometheus_client collector over one cluster (or one node of it)."""

    def __init__(self, gcs: Gcs, node_id: str | None = None):
        self.gcs = gcs
        self.node_id = node_id

    def describe(self) -> list[Metric]:
        return []  # (no fixed set: families depend on what the cluster holds)

    def collect(self) -> Iterator[Metric]:
        nodes = self.gcs.nodes()
        if self.node_id is not None:
            nodes = [n for n in nodes if n["node_id"] == self.node_id]
        yield from self._node_metrics(nodes)
        if self.node_id is None:
            yield from self._cluster_metrics(nodes)
        yield from self._user_metrics(nodes)

    # -- per node ----------------------------------------------------------------------------
    def _node_labels(self, info: dict[str, Any]) -> list[str]:
        head = bool(info.get("is_head"))
        return [
            str(info.get("node_ip_address") or ""),
            info["node_id"],
            self.gcs.cluster,
            "true" if head else "false",
            "head" if head else "worker",
        ]

    def _node_metrics(self, nodes: list[dict[str, Any]]) -> Iterator[Metric]:
        live = [n for n in nodes if n.get("alive")]
        gauges = {
            name: GaugeMetricFamily(name, text, labels=NODE_LABELS)
            for name, text in (
                ("ray_node_cpu_utilization", "Total CPU usage on a ray node (percentage)"),
                ("ray_node_cpu_count", "Total CPUs available on a ray node"),
                ("ray_node_mem_used", "Memory usage on a ray node (bytes)"),
                ("ray_node_mem_available", "Memory available on a ray node (bytes)"),
                ("ray_node_mem_total", "Total memory on a ray node (bytes)"),
                ("ray_node_mem_used_host", "Host memory usage on a ray node (bytes)"),
                ("ray_node_mem_total_host", "Total host memory on a ray node (bytes)"),
                ("ray_object_store_num_local_objects", "Objects in the node's store"),
                ("ray_object_store_used_memory", "Bytes used in the node's store"),
                ("ray_object_store_available_memory", "Bytes free in the node's store"),
                ("redray_leases", "Worker leases the node's raylet has granted and not ended"),
                ("redray_workers", "Worker processes of the node"),
                ("redray_pending_lease_requests", "Lease requests waiting on the node"),
            )
        }
        resources = GaugeMetricFamily(
            "ray_resources",
            "Logical Ray resources broken per state {AVAILABLE, USED}",
            labels=["Name", "State", *NODE_LABELS],
        )
        store = GaugeMetricFamily(
            "ray_object_store_memory",
            "Object store memory by various sub-kinds on this node",
            labels=["Location", *NODE_LABELS],
        )
        spills = CounterMetricFamily(
            "ray_spill_manager_request",
            "Objects spilled to and restored from disk since the node started",
            labels=["Type", *NODE_LABELS],
        )
        spilled_now = GaugeMetricFamily(
            "ray_spill_manager_objects",
            "Objects of the node's store that are only on disk",
            labels=["Type", *NODE_LABELS],
        )
        for info in live:
            labels = self._node_labels(info)
            load = info.get("load") or {}
            host = {
                "ray_node_cpu_utilization": load.get("cpu_percent"),
                "ray_node_cpu_count": load.get("cpu_count"),
                "ray_node_mem_used": load.get("mem_used"),
                "ray_node_mem_available": load.get("mem_available"),
                "ray_node_mem_total": load.get("mem_total"),
                "ray_node_mem_used_host": load.get("mem_used"),
                "ray_node_mem_total_host": load.get("mem_total"),
                "ray_object_store_num_local_objects": load.get("num_objects"),
                "ray_object_store_used_memory": load.get("store_used"),
                "redray_leases": load.get("leases"),
                "redray_workers": load.get("workers"),
                "redray_pending_lease_requests": load.get("pending"),
            }
            capacity = load.get("store_capacity", info.get("object_store_memory"))
            if capacity is not None and load.get("store_used") is not None:
                host["ray_object_store_available_memory"] = capacity - load["store_used"]
            for name, value in host.items():
                if value is not None:
                    gauges[name].add_metric(labels, float(value))
            total = dict(info.get("resources") or {})
            available = info.get("available") or {}
            if capacity is not None:
                total["object_store_memory"] = capacity
                available = {
                    **available,
                    "object_store_memory": capacity - load.get("store_used", 0),
                }
            for name, amount in sorted(total.items()):
                if name.startswith("node:"):
                    continue
                free = float(available.get(name, 0.0))
                resources.add_metric([name, "AVAILABLE", *labels], free)
                resources.add_metric([name, "USED", *labels], max(0.0, float(amount) - free))
            if load.get("store_used") is not None:
                store.add_metric(["MMAP_SHM", *labels], float(load["store_used"]))
                store.add_metric(["SPILLED", *labels], float(load.get("disk_bytes", 0)))
            spills.add_metric(["Spilled", *labels], float(load.get("spilled_objects", 0)))
            spills.add_metric(["Restored", *labels], float(load.get("restored_objects", 0)))
            spilled_now.add_metric(["Spilled", *labels], float(load.get("num_spilled", 0)))
        yield from gauges.values()
        yield from (resources, store, spills, spilled_now)

    # -- the cluster's tables ---------------------------------------------------------------
    def _cluster_metrics(self, nodes: list[dict[str, Any]]) -> Iterator[Metric]:
        by_state = Counter("ALIVE" if n.get("alive") else "DEAD" for n in nodes)
        node_family = GaugeMetricFamily(
            "redray_nodes", "Nodes of the cluster by state", labels=["State", "SessionName"]
        )
        for state in ("ALIVE", "DEAD"):
            node_family.add_metric([state, self.gcs.cluster], by_state.get(state, 0))
        yield node_family

        task_counts: Counter = Counter()
        for record in tasks.all_tasks(self.gcs):
            task_counts[
                (
                    record.get("name") or "?",
                    record.get("state") or "NIL",
                    "1" if int(record.get("attempt_number") or 0) > 0 else "0",
                    record.get("job_id") or "",
                )
            ] += 1
        task_family = GaugeMetricFamily(
            "ray_tasks",
            "Current number of tasks currently in a particular state (attempts stored).",
            labels=["Name", "State", "IsRetry", "JobId", "Source", "SessionName"],
        )
        for (name, state, retry, job), count in sorted(task_counts.items()):
            task_family.add_metric([name, state, retry, job, "owner", self.gcs.cluster], count)
        yield task_family

        actor_counts = Counter(
            (a.class_name or "?", a.state or "", a.job_id or "") for a in cluster.actors(self.gcs)
        )
        actor_family = GaugeMetricFamily(
            "ray_actors",
            "Current number of actors currently in a particular state.",
            labels=["Name", "State", "JobId", "Source", "SessionName"],
        )
        for (name, state, job), count in sorted(actor_counts.items()):
            actor_family.add_metric([name, state, job, "gcs", self.gcs.cluster], count)
        yield actor_family

        pg_counts = Counter(pg.state or "" for pg in cluster.placement_groups(self.gcs))
        pg_family = GaugeMetricFamily(
            "ray_placement_groups",
            "Current number of placement groups by state.",
            labels=["State", "Source", "SessionName"],
        )
        for state, count in sorted(pg_counts.items()):
            pg_family.add_metric([state, "gcs", self.gcs.cluster], count)
        yield pg_family

        dropped = keys.dropped_counts(self.gcs)
        dropped_family = CounterMetricFamily(
            "redray_task_events_dropped",
            "Task attempts not kept by the task-event store, by reason (retention: past the "
            "cluster's cap; job_cap: past a job's cap; buffer: lost before reaching Redis)",
            labels=["Reason", "SessionName"],
        )
        for reason in ("retention", "job_cap", "buffer"):
            dropped_family.add_metric([reason, self.gcs.cluster], dropped.get(reason, 0))
        yield dropped_family
        ray_dropped = GaugeMetricFamily(
            "ray_gcs_task_manager_task_events_dropped",
            "Task events dropped (Ray's name; all of redray's are status events)",
            labels=["Type", "SessionName"],
        )
        ray_dropped.add_metric(
            ["STATUS_EVENT", self.gcs.cluster],
            sum(dropped.values()) - sum(v for k, v in dropped.items() if k.startswith("job:")),
        )
        yield ray_dropped
        stored = GaugeMetricFamily(
            "ray_gcs_task_manager_task_events_stored",
            "Task attempts held by the task-event store",
            labels=["SessionName"],
        )
        stored.add_metric([self.gcs.cluster], keys.task_count(self.gcs))
        yield stored

    # -- user metrics (redray.util.metrics), named as Ray exports them -----------------------
    def _user_metrics(self, nodes: list[dict[str, Any]]) -> Iterator[Metric]:
        addresses = {n["node_id"]: str(n.get("node_ip_address") or "") for n in nodes}
        families: dict[str, list[dict[str, Any]]] = {}
        for metric in read_metrics(self.gcs):
            node = metric["labels"].get("NodeId")
            if self.node_id is not None and node != self.node_id:
                continue
            families.setdefault(metric["name"], []).append(metric)
        for name, entries in sorted(families.items()):
            kind = entries[0]["type"]
            entries = [e for e in entries if e["type"] == kind]  # (one type per family)
            tag_keys = sorted({k for e in entries for s in e["series"] for k in s["tags"]})
            base = [k for k in USER_LABELS if k not in tag_keys]
            labels = tag_keys + base
            description = entries[0].get("description") or name
            full = f"ray_{name}"
            if kind == "counter":
                family: Metric = CounterMetricFamily(full, description, labels=labels)
                legacy = GaugeMetricFamily(
                    full,
                    f"(DEPRECATED, use {full}_total metric instead) {description}",
                    labels=labels,
                )
            elif kind == "gauge":
                family, legacy = GaugeMetricFamily(full, description, labels=labels), None
            else:
                family, legacy = HistogramMetricFamily(full, description, labels=labels), None
            for entry in entries:
                process = entry["labels"]
                own = {
                    "Component": process.get("Component", ""),
                    "JobId": process.get("JobId", ""),
                    "NodeAddress": addresses.get(process.get("NodeId"), ""),
                    "WorkerId": process.get("WorkerId", ""),
                    "SessionName": self.gcs.cluster,
                }
                for series in entry["series"]:
                    values = [str(series["tags"].get(k, "")) for k in tag_keys]
                    values += [own[k] for k in base]
                    if kind == "histogram":
                        bounds = entry.get("boundaries") or []
                        cumulative, running = [], 0
                        for bound, count in zip([*bounds, "+Inf"], series["buckets"], strict=False):
                            running += count
                            cumulative.append(
                                (str(float(bound)) if bound != "+Inf" else bound, running)
                            )
                        family.add_metric(values, cumulative, series["sum"])
                    else:
                        family.add_metric(values, series["value"])
                        if legacy is not None:
                            legacy.add_metric(values, series["value"])
            yield family
            if legacy is not None:
                yield legacy
