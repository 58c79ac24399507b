"""The tasks' timeline as Chrome trace events (chrome://tracing, Perfetto): one process per
node, one thread (row) per worker, one complete ("X") slice per task attempt that ran."""

from __future__ import annotations

from typing import Any

from redray.gcs import Gcs
from redray.state import tasks


def chrome_trace(gcs: Gcs) -> list[dict[str, Any]]:
    """Trace events of every stored attempt with a start time (running ones end now)."""
    records = [r for r in tasks.all_tasks(gcs) if r.get("start_time_ms")]
    records.sort(key=lambda r: r["start_time_ms"])
    nodes: dict[str, int] = {}
    workers: dict[tuple[str, str], int] = {}
    events: list[dict[str, Any]] = []
    for record in records:
        node = record.get("node_id") or "unknown"
        worker = record.get("worker_id") or "unknown"
        if node not in nodes:
            nodes[node] = len(nodes) + 1
            events.append(
                {
                    "ph": "M",
                    "name": "process_name",
                    "pid": nodes[node],
                    "args": {"name": f"Node {node}"},
                }
            )
        key = (node, worker)
        if key not in workers:
            workers[key] = len(workers) + 1
            label = f"Worker {worker[:12]} (pid {record.get('worker_pid')})"
            events.append(
                {
                    "ph": "M",
                    "name": "thread_name",
                    "pid": nodes[node],
                    "tid": workers[key],
                    "args": {"name": label},
                }
            )
        start = int(record["start_time_ms"])
        end = int(record.get("end_time_ms") or start)
        events.append(
            {
                "cat": "task::" + (record.get("name") or "?"),
                "name": record.get("name") or "?",
                "ph": "X",
                "pid": nodes[node],
                "tid": workers[key],
                "ts": start * 1000,
                "dur": max(end - start, 0) * 1000,
                "args": {
                    "task_id": record.get("task_id"),
                    "attempt_number": record.get("attempt_number"),
                    "state": record.get("state"),
                    "job_id": record.get("job_id"),
                    "actor_id": record.get("actor_id"),
                    "error_type": record.get("error_type"),
                },
            }
        )
    return events
