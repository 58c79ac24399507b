"""User metrics (`redray.util.metrics`): aggregated in the process that records them, written
to Redis by a background thread every REPORT_INTERVAL (one round trip per process per
interval, replacing that process's previous snapshot), and read back with `read_metrics`.

A process's metrics live under its own key with a TTL of a few intervals: when it dies they
expire, as a Prometheus target's series go when the target does.

REDRAY_METRICS_REPORT_INTERVAL_MS (Ray's RAY_metrics_report_interval_ms): how often (1000).
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
from typing import Any

from redray.core import context
from redray.gcs import Gcs
from redray.state import keys

log = logging.getLogger(__name__)

MAX_SERIES_PER_METRIC = 10_000  # distinct tag sets kept per metric in one process


def report_interval() -> float:
    raw = os.environ.get("REDRAY_METRICS_REPORT_INTERVAL_MS") or os.environ.get(
        "RAY_metrics_report_interval_ms", "1000"
    )
    try:
        return max(int(raw), 50) / 1000.0
    except ValueError:
        raise ValueError(
            f"REDRAY_METRICS_REPORT_INTERVAL_MS must be an integer, got {raw!r}"
        ) from None


class MetricSeries:
    """One metric's values in this process, by tag set (thread-safe)."""

    def __init__(self, kind: str, name: str, description: str, tag_keys: tuple, boundaries):
        self.kind = kind
        self.name = name
        self.description = description
        self.tag_keys = tag_keys
        self.boundaries = list(boundaries or [])
        self.lock = threading.Lock()
        self.values: dict[tuple, Any] = {}
        self.dropped = 0

    def record(self, tags: tuple, value: float) -> None:
        with self.lock:
            current = self.values.get(tags)
            if current is None and len(self.values) >= MAX_SERIES_PER_METRIC:
                self.dropped += 1
                return
            if self.kind == "counter":
                self.values[tags] = (current or 0.0) + value
            elif self.kind == "gauge":
                self.values[tags] = value
            else:
                if current is None:
                    current = self.values[tags] = [[0] * (len(self.boundaries) + 1), 0.0, 0]
                current[0][bisect.bisect_left(self.boundaries, value)] += 1
                current[1] += value
                current[2] += 1

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            series = []
            for tags, value in self.values.items():
                labels = dict(zip(self.tag_keys, tags, strict=True))
                if self.kind == "histogram":
                    buckets, total, count = value
                    series.append(
                        {"tags": labels, "buckets": list(buckets), "sum": total, "count": count}
                    )
                else:
                    series.append({"tags": labels, "value": value})
        return {
            "type": self.kind,
            "description": self.description,
            "tag_keys": list(self.tag_keys),
            "boundaries": self.boundaries,
            "series": series,
        }


class MetricsRegistry:
    """This process's metrics and the thread that writes them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.metrics: dict[str, MetricSeries] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._pid = os.getpid()

    def register(self, kind: str, name: str, description: str, tag_keys: tuple, boundaries):
        """The series of metric `name` (made once; a second definition must agree)."""
        with self.lock:
            if os.getpid() != self._pid:  # a forked child starts with no metrics of its own
                self.metrics, self._thread, self._pid = {}, None, os.getpid()
            series = self.metrics.get(name)
            if series is None:
                series = self.metrics[name] = MetricSeries(
                    kind, name, description, tag_keys, boundaries
                )
            elif series.kind != kind or series.tag_keys != tag_keys:
                raise ValueError(
                    f"metric {name!r} is already defined as a {series.kind} with tag keys "
                    f"{series.tag_keys}"
                )
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, daemon=True, name="redray-metrics"
                )
                self._thread.start()
        return series

    def _run(self) -> None:
        interval = report_interval()
        while not self._stop.wait(interval):
            try:
                self.flush()
            except Exception as exc:  # Redis away, or not connected yet: next time
                log.debug("writing metrics failed: %s", exc)

    def flush(self) -> bool:
        """Write this process's metrics now; False when the process is not connected."""
        worker = context.current
        if worker is None or worker.shutting_down:
            return False
        with self.lock:
            metrics = {name: series.snapshot() for name, series in self.metrics.items()}
        labels = {
            "NodeId": worker.node_id,
            "WorkerId": worker.worker_id.hex(),
            "JobId": worker.job_id,
            "pid": str(os.getpid()),
            "Component": "driver" if worker.mode == "driver" else "core_worker",
        }
        ttl = max(1.0, report_interval() * 5)
        keys.write_metrics(worker.gcs, worker.worker_id.hex(), labels, metrics, ttl)
        return True


registry = MetricsRegistry()


def read_metrics(gcs: Gcs) -> list[dict[str, Any]]:
    """Every live process's metrics: one entry per (metric, process) with its `labels`
    (NodeId, WorkerId, JobId, pid, Component) and series, as the Prometheus exporter
    needs them. Processes that stopped writing expire within a few report intervals."""
    out = []
    for labels, metrics in keys.read_metrics_raw(gcs):
        for name, record in sorted(metrics.items()):
            out.append({"name": name, "labels": labels, **record})
    return out


def metric_rows(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per series (the CLI's `redray list metrics`)."""
    rows = []
    for metric in metrics:
        for series in metric["series"]:
            row = {
                "name": metric["name"],
                "type": metric["type"],
                "tags": series["tags"],
                "node_id": metric["labels"].get("NodeId"),
                "pid": metric["labels"].get("pid"),
            }
            if metric["type"] == "histogram":
                row["value"] = {"count": series["count"], "sum": series["sum"]}
            else:
                row["value"] = series["value"]
            rows.append(row)
    return rows
