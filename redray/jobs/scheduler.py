"""The leader's job queue: pending jobs go, oldest first, to nodes whose entrypoint room fits.

It runs on a thread of its own in the head's control loop process, and acts only while the
control loop leads (every placement is fenced by the tenure's epoch, so a deposed leader
cannot place a job twice). A pass runs when a submission or a job's end wakes it, and every
PASS_SECONDS anyway; it reads the active table and at most HEAD_BATCH queued jobs, so its
memory does not grow with the queue. A node's room for entrypoints is its total resources
less the entrypoint resources of the jobs placed there (tasks give theirs back as their
leases end), and at most MAX_RUNNING_JOBS_PER_NODE jobs run on a node at once.

Strict FIFO: a job that fits some node but none right now blocks those behind it; a job no
node could ever run waits without blocking the others, until a node that fits joins.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from typing import Any

from redray.control.tenure import Tenure
from redray.gcs import Gcs, NotLeaderError
from redray.jobs.keys import JobKeys
from redray.node import scheduling
from redray.watcher import is_connection_error

log = logging.getLogger(__name__)

PASS_SECONDS = 0.5
HEAD_BATCH = 100
MAX_RUNNING_JOBS_PER_NODE = int(os.environ.get("REDRAY_MAX_RUNNING_JOBS_PER_NODE", "16"))


class JobScheduler:
    """Places queued jobs on nodes while this head leads."""

    def __init__(self, gcs_url: str, cluster: str, tenure: Tenure, stopping: threading.Event):
        self.gcs = Gcs(gcs_url, cluster)
        self.keys = JobKeys(self.gcs)
        self.tenure = tenure
        self.stopping = stopping
        self._failing = False

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True, name="redray-jobs").start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            fence = self.tenure.fence
            if fence is None:
                self.stopping.wait(PASS_SECONDS)
                continue
            try:
                self.keys.wait_for_work(PASS_SECONDS)
                if self.tenure.fence == fence:
                    self.place(fence)
                self._failing = False
            except NotLeaderError:
                self.stopping.wait(PASS_SECONDS)
            except Exception as exc:
                if not self._failing:
                    self._failing = True
                    if is_connection_error(exc):
                        log.warning("job queue: Redis is unreachable (%s)", exc)
                    else:
                        log.exception("job queue pass failed")
                self.stopping.wait(PASS_SECONDS)

    def place(self, fence: Any) -> None:
        """One pass: fail the jobs of dead nodes, then place the queue's head."""
        active = self.keys.active()
        head = self.keys.queue_head(HEAD_BATCH)
        if not active and not head:
            return  # (an idle cluster costs two reads per pass)
        nodes = self.gcs.live_nodes()
        known = {node["node_id"] for node in nodes}
        alive = {node["node_id"]: node for node in nodes if node["alive"]}
        used: dict[str, Counter] = {node_id: Counter() for node_id in alive}
        running: Counter = Counter()
        for sid, entry in active.items():
            node_id = entry["node_id"]
            if node_id not in known:
                self.keys.finish(sid, "FAILED", f"The node {node_id} running the job died.")
                self.keys.drop_intake(node_id)
                continue
            used.setdefault(node_id, Counter()).update(entry["resources"])
            running[node_id] += 1
        if not head:
            return
        for sid, info in zip(head, self.keys.infos(head), strict=True):
            need = (info or {}).get("entrypoint_resources") or {}
            fitting = [
                node_id
                for node_id, node in alive.items()
                if running[node_id] < MAX_RUNNING_JOBS_PER_NODE
                and scheduling.fits(need, _room(node["resources"], used[node_id]))
            ]
            if not fitting:
                if any(scheduling.fits(need, n["resources"]) for n in alive.values()):
                    return  # it will fit once a job ends: those behind it wait their turn
                continue
            # The node with the most room left for entrypoints (so not always the head).
            node_id = max(fitting, key=lambda n: (-running[n], -sum(used[n].values())))
            if self.keys.assign(fence, sid, node_id, need):
                used[node_id].update(need)
                running[node_id] += 1


def _room(total: dict[str, float], used: Counter) -> dict[str, float]:
    return {name: amount - used.get(name, 0.0) for name, amount in total.items()}
