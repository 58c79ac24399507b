"""What a raylet answers about its node for the state API, over its authenticated listener:
its workers and drivers (and recently ended ones), the objects its processes hold, and its
log files (listed by glob, read by name: never a path outside the node's log directory).

Requests are ("state_query", call_id, kind, args); every answer is bounded (at most `limit`
entries, at most MAX_LOG_READ bytes of a log per request). Runs on the raylet's reactor
thread; file reads are small and bounded.
"""

from __future__ import annotations

import collections
import fnmatch
import itertools
import os
import time
from typing import Any

MAX_DEAD_WORKERS = int(os.environ.get("REDRAY_MAX_DEAD_WORKERS", "1000"))
MAX_LOG_READ = 1 << 20  # bytes per read request
FANOUT_TIMEOUT_SECONDS = 5.0
MAX_LIMIT = 100_000


class NodeStateService:
    """The state-API side of one raylet (reactor thread)."""

    def __init__(self, raylet: Any):
        self.raylet = raylet
        self.log_dir = os.path.join(raylet.config["session_dir"], "logs")
        self.dead_workers: collections.deque[dict[str, Any]] = collections.deque()
        self._call_ids = itertools.count(1)
        self._fanouts: dict[int, Any] = {}  # call id -> the gathering it answers

    @property
    def handlers(self) -> dict[str, Any]:
        return {"state_query": self.on_query, "reply": self.on_reply}

    # -- requests ---------------------------------------------------------------------------
    def on_query(self, conn: Any, message: tuple) -> None:
        _, call_id, kind, args = message
        try:
            if kind == "objects":
                self._gather_objects(conn, call_id, _limit(args.get("limit")))
                return
            if kind == "workers":
                result: Any = self.workers(_limit(args.get("limit")))
            elif kind == "list_logs":
                result = self.list_logs(args.get("glob") or "*")
            elif kind == "read_log":
                result = self.read_log(
                    args["filename"], args.get("offset"), args.get("tail"), args.get("max_bytes")
                )
            else:
                raise ValueError(f"unknown state query {kind!r}")
        except (ValueError, OSError, KeyError, TypeError) as exc:
            result = _error(exc)
        conn.send(("reply", call_id, result))

    def workers(self, limit: int) -> list[dict[str, Any]]:
        """Live workers and drivers of this node, then recently ended ones (newest first)."""
        raylet = self.raylet
        node_id, ip = raylet.node_id, raylet.host
        out: list[dict[str, Any]] = []
        for worker in raylet.workers.values():
            out.append(
                {
                    "worker_id": worker.worker_id.hex(),
                    "is_alive": True,
                    "worker_type": "WORKER",
                    "node_id": node_id,
                    "ip": ip,
                    "pid": worker.pid or None,
                    "worker_launch_time_ms": int(worker.launched * 1000),
                    "start_time_ms": int(worker.launched * 1000),
                }
            )
        for conn, client_id in raylet.clients.items():
            if conn.info.get("mode") == "driver":
                out.append(
                    {
                        "worker_id": client_id.hex(),
                        "is_alive": True,
                        "worker_type": "DRIVER",
                        "node_id": node_id,
                        "ip": ip,
                        "pid": conn.info.get("pid"),
                    }
                )
        out.extend(reversed(self.dead_workers))
        return out[:limit]

    def worker_died(self, worker: Any, exit_detail: str = "") -> None:
        """Remember an ended worker (bounded); the oldest forgotten take their logs along."""
        self.dead_workers.append(
            {
                "worker_id": worker.worker_id.hex(),
                "is_alive": False,
                "worker_type": "WORKER",
                "exit_type": "SYSTEM_ERROR" if not worker.retiring else "INTENDED_SYSTEM_EXIT",
                "exit_detail": exit_detail,
                "node_id": self.raylet.node_id,
                "ip": self.raylet.host,
                "pid": worker.pid or None,
                "worker_launch_time_ms": int(worker.launched * 1000),
                "start_time_ms": int(worker.launched * 1000),
                "end_time_ms": int(time.time() * 1000),
            }
        )
        while len(self.dead_workers) > MAX_DEAD_WORKERS:
            gone = self.dead_workers.popleft()
            for suffix in ("out", "err"):
                path = os.path.join(
                    self.log_dir, f"worker-{gone['worker_id']}-{gone['pid']}.{suffix}"
                )
                try:
                    os.unlink(path)
                except OSError:
                    pass

    # -- objects: asked of every process connected here -------------------------------------
    def _gather_objects(self, conn: Any, call_id: int, limit: int) -> None:
        clients = [c for c in self.raylet.clients if c is not conn and not c.closed]
        gathering = {"conn": conn, "call_id": call_id, "waiting": set(), "objects": [], "failed": 0}
        for client in clients:
            sub_id = next(self._call_ids)
            self._fanouts[sub_id] = gathering
            gathering["waiting"].add(sub_id)
            if not client.send(("state_objects", sub_id, limit)):
                self._fanouts.pop(sub_id, None)
                gathering["waiting"].discard(sub_id)
                gathering["failed"] += 1
        if not gathering["waiting"]:
            self._answer(gathering)
            return
        self.raylet.reactor.call_later(FANOUT_TIMEOUT_SECONDS, self._expire, gathering)

    def on_reply(self, conn: Any, message: tuple) -> None:
        gathering = self._fanouts.pop(message[1], None)
        if gathering is None:
            return
        gathering["waiting"].discard(message[1])
        if isinstance(message[2], list):
            for entry in message[2]:
                entry.setdefault("ip", self.raylet.host)
            gathering["objects"].extend(message[2])
        if not gathering["waiting"]:
            self._answer(gathering)

    def _expire(self, gathering: dict[str, Any]) -> None:
        if gathering.get("answered"):
            return
        for sub_id in gathering["waiting"]:
            self._fanouts.pop(sub_id, None)
        gathering["failed"] += len(gathering["waiting"])
        gathering["waiting"] = set()
        self._answer(gathering)

    def _answer(self, gathering: dict[str, Any]) -> None:
        gathering["answered"] = True
        store = self.raylet.store.stats()
        result = {
            "objects": gathering["objects"],
            "unanswered": gathering["failed"],
            "store": {k: store[k] for k in ("capacity", "used", "num_objects", "num_spilled")},
        }
        gathering["conn"].send(("reply", gathering["call_id"], result))

    # -- logs -------------------------------------------------------------------------------
    def list_logs(self, pattern: str) -> dict[str, list[str]]:
        """Log file names matching a glob, by Ray's categories."""
        try:
            names = sorted(os.listdir(self.log_dir))
        except FileNotFoundError:
            names = []
        found: dict[str, list[str]] = {}
        for name in names:
            if not fnmatch.fnmatch(name, pattern):
                continue
            if name.startswith("worker-"):
                category = "worker_out" if name.endswith(".out") else "worker_err"
            elif name.startswith("raylet"):
                category = "raylet"
            elif name.startswith("redis"):
                category = "gcs_server"
            else:
                category = "misc"
            found.setdefault(category, []).append(name)
        return found

    def read_log(
        self, filename: str, offset: int | None, tail: int | None, max_bytes: int | None
    ) -> dict[str, Any]:
        """Bytes of a log file: from `offset` (following), or its last `tail` lines (tail
        < 0 or None: from the start); at most MAX_LOG_READ bytes per request."""
        if not isinstance(filename, str) or os.sep in filename or filename in ("", ".", ".."):
            raise ValueError(f"not a log file name: {filename!r}")
        path = os.path.join(self.log_dir, filename)
        budget = min(int(max_bytes or MAX_LOG_READ), MAX_LOG_READ)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if offset is None and tail is not None and tail >= 0:
                offset = _tail_offset(f, size, tail, budget)
            offset = max(0, min(int(offset or 0), size))
            f.seek(offset)
            data = f.read(budget)
        return {"data": data, "offset": offset + len(data), "size": size}


def _tail_offset(f: Any, size: int, lines: int, budget: int) -> int:
    """Where the last `lines` lines of a file start (looking back at most `budget` bytes)."""
    if lines == 0:
        return size
    start = max(0, size - budget)
    f.seek(start)
    chunk = f.read(size - start)
    end = len(chunk) - 1 if chunk.endswith(b"\n") else len(chunk)
    position = end
    for _ in range(lines):
        position = chunk.rfind(b"\n", 0, position)
        if position < 0:
            return start
    return start + position + 1


def _limit(value: Any) -> int:
    if value is None:
        return MAX_LIMIT
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"limit must be a positive integer, got {value!r}")
    return min(value, MAX_LIMIT)


def _error(exc: BaseException) -> dict[str, str]:
    return {"error": f"{type(exc).__name__}: {exc}"}
