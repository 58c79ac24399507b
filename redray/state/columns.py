"""Finished task attempts stored as columns: the form most attempts take in Redis.

A raylet's write stores the attempts of one job's function (or actor method) that finished
with their worker's reply as one *piece*: their ids, and a body holding everything else as
columns. Storing a piece is a few Redis values whatever its size, and building one is a few
C-level conversions per column rather than a formatted record per attempt: that is what
keeps recording task events cheap (see events.py). Readers expand a piece into the records
`keys.read_tasks` returns for other attempts.

- ids: for each attempt, its task id and its attempt number (2 bytes, big-endian);
- span: where a task is found by its id. A task id is its owner's prefix and a counter
  (redray.core.ids); a piece holds tasks of one owner whose counters lie within SPAN of each
  other, and its span is that owner, the lowest counter and the highest, so the pieces that
  may hold a task are those of its owner whose lowest counter is at most SPAN below its own
  (keys.OWNERS keeps them in that order);
- body: one JSON line of what the attempts share and the tables their rows point into
  (nodes, workers, parent tasks), then the columns, little-endian: created, pushed, started,
  ended (float64 wall-clock seconds; pushed 0: never pushed), node and worker (uint16 row of
  the table), pid (uint32), parent (uint32: 0 none, k: the k-th parent).
"""

from __future__ import annotations

import json
import sys
from array import array
from typing import Any

from redray.core.ids import COUNTER_BYTES, OWNER_BYTES, TASK_ID_BYTES, counter_of

ATTEMPT_BYTES = 2
ID_BYTES = TASK_ID_BYTES + ATTEMPT_BYTES
SPAN = 1 << 14  # the most a piece's task counters differ by
SPAN_BYTES = OWNER_BYTES + 2 * COUNTER_BYTES
_ATTEMPTS = tuple(n.to_bytes(ATTEMPT_BYTES, "big") for n in range(256))
_TIME_COLUMNS = ("creation_time_ms", "submitted_time_ms", "start_time_ms", "end_time_ms")
_SWAP = sys.byteorder == "big"  # the stored columns are little-endian
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


def _bytes(column: array) -> bytes:
    if _SWAP:
        column.byteswap()
    return column.tobytes()


def _column(kind: str, data: bytes, offset: int, rows: int) -> tuple[array, int]:
    column = array(kind)
    end = offset + rows * column.itemsize
    column.frombytes(data[offset:end])
    if _SWAP:
        column.byteswap()
    return column, end


class Ended:
    """Finished attempts of one owner's calls of one job's function (or actor method), each
    with its worker's reply, gathered as columns: the owner appends each call's fields as it
    ends (no object per call stays alive until the shipment, which would make the garbage
    collector's work grow with the call rate), its raylet stores them as pieces.

    `reported`: the attempts were reported pending or running before (their records in
    Redis go out of date); `running`: some were reported running by their worker."""

    __slots__ = (
        "name",
        "job_id",
        "actor_id",
        "resources",
        "reported",
        "running",
        "ids",
        "created",
        "pushed",
        "started",
        "ended",
        "worker_rows",
        "parent_rows",
        "workers",
        "parents",
        "low",
        "high",
    )

    def __init__(
        self,
        name: str,
        job_id: str,
        actor_id: bytes | None,
        resources: dict | None,
        reported: bool,
    ):
        self.name = name
        self.job_id = job_id
        self.actor_id = actor_id
        self.resources = resources
        self.reported = reported
        self.running = False
        self.ids = bytearray()  # task id and attempt (ATTEMPT_BYTES, big-endian) per row
        self.created = array("d")
        self.pushed = array("d")  # 0.0: never pushed
        self.started = array("d")
        self.ended = array("d")
        self.worker_rows = array("H")
        self.parent_rows = array("I")  # 0: no parent, k: the k-th of `parents`
        self.workers: dict[tuple[str, str, int], int] = {}  # (node, worker, pid) -> row
        self.parents: dict[bytes | None, int] = {None: 0}
        self.low = self.high = b""  # the lowest and highest task id

    def add(
        self,
        task_id: bytes,
        attempt: int,
        created: float,
        pushed: float,
        ended: float,
        run: tuple,
        parent: bytes | None,
    ) -> None:
        """One more attempt (run: its worker's (started, reported running, node, worker,
        pid)); attempt below 2**16, task_id of TASK_ID_BYTES."""
        self.ids += task_id
        self.ids += _ATTEMPTS[attempt] if attempt < 256 else attempt.to_bytes(ATTEMPT_BYTES, "big")
        self.created.append(created)
        self.pushed.append(pushed)
        self.started.append(run[0])
        self.ended.append(ended)
        host = run[2:]
        row = self.workers.get(host)
        if row is None:
            row = self.workers[host] = len(self.workers)
        self.worker_rows.append(row)
        row = self.parents.get(parent)
        if row is None:
            row = self.parents[parent] = len(self.parents)
        self.parent_rows.append(row)
        if run[1]:
            self.running = True
        if not self.low or task_id < self.low:
            self.low = task_id
        if task_id > self.high:
            self.high = task_id

    def __len__(self) -> int:
        return len(self.created)

    def task_ids(self) -> list[bytes]:
        ids = self.ids
        return [bytes(ids[at : at + TASK_ID_BYTES]) for at in range(0, len(ids), ID_BYTES)]

    def take(self, rows: list[int]) -> Ended:
        """The attempts at these rows (the same tables)."""
        part = Ended(self.name, self.job_id, self.actor_id, self.resources, self.reported)
        part.running = self.running
        ids = self.ids
        part.ids = bytearray(b"".join(ids[r * ID_BYTES : (r + 1) * ID_BYTES] for r in rows))
        for name in ("created", "pushed", "started", "ended", "worker_rows", "parent_rows"):
            column = getattr(self, name)
            setattr(part, name, array(column.typecode, map(column.__getitem__, rows)))
        part.workers, part.parents = self.workers, self.parents
        task_ids = part.task_ids()
        part.low, part.high = min(task_ids), max(task_ids)
        return part


def cut(ended: Ended, most: int) -> list[Ended]:
    """The attempts as pieces of at most `most` attempts, each of one owner whose task
    counters lie within SPAN (in the order given, unless they must be cut)."""
    low, high = ended.low, ended.high
    rows = len(ended)
    if low[:OWNER_BYTES] == high[:OWNER_BYTES] and counter_of(high) - counter_of(low) <= SPAN:
        if rows <= most:
            return [ended]
        return [ended.take(list(range(s, min(s + most, rows)))) for s in range(0, rows, most)]
    task_ids = ended.task_ids()
    order = sorted(range(rows), key=task_ids.__getitem__)
    pieces: list[Ended] = []
    first = 0
    low = task_ids[order[0]]
    for n, row in enumerate(order):
        task_id = task_ids[row]
        if (
            n - first >= most
            or task_id[:OWNER_BYTES] != low[:OWNER_BYTES]
            or counter_of(task_id) - counter_of(low) > SPAN
        ):
            pieces.append(ended.take(order[first:n]))
            first, low = n, task_id
    pieces.append(ended.take(order[first:]))
    return pieces


def span_of(ended: Ended) -> bytes:
    """The span of a piece of these attempts: their owner, their lowest task counter and
    their highest (see above)."""
    return ended.low + ended.high[OWNER_BYTES:]


def search_bounds(task_id: bytes) -> tuple[bytes, bytes]:
    """(highest, lowest): ZREVRANGEBYLEX bounds of the spans of the pieces that may hold the
    task (the same owner, the lowest counter at most the task's and at most SPAN below)."""
    counter = counter_of(task_id)
    owner = task_id[:OWNER_BYTES]
    high = owner + (counter + 1).to_bytes(COUNTER_BYTES, "big")
    low = owner + max(0, counter - SPAN).to_bytes(COUNTER_BYTES, "big")
    return b"(" + high, b"[" + low


def may_hold(span: bytes, task_id: bytes) -> bool:
    """Whether a piece of this span may hold the task."""
    return span[:OWNER_BYTES] == task_id[:OWNER_BYTES] and (
        span[OWNER_BYTES : OWNER_BYTES + COUNTER_BYTES]
        <= task_id[OWNER_BYTES:]
        <= span[OWNER_BYTES + COUNTER_BYTES : SPAN_BYTES]
    )


def encode(ended: Ended, resources_json: str | None) -> tuple[bytes, bytes, list[str]]:
    """(ids, body, nodes) of a piece holding these attempts."""
    hosts = list(ended.workers)  # (node, worker, pid) by row
    used = list(dict.fromkeys(ended.worker_rows))  # (a piece cut from more: not every worker)
    nodes = list(dict.fromkeys(hosts[row][0] for row in used))
    node_row, worker_row, pid = [0] * len(hosts), [0] * len(hosts), [0] * len(hosts)
    for n, row in enumerate(used):
        node_row[row] = nodes.index(hosts[row][0])
        worker_row[row] = n
        pid[row] = hosts[row][2]
    parents = [parent for parent in ended.parents if parent is not None]
    shared = {
        "name": ended.name,
        "job_id": ended.job_id,
        "actor_id": ended.actor_id.hex() if ended.actor_id else None,
        "required_resources": resources_json,
        "nodes": nodes,
        "workers": [hosts[row][1] for row in used],
        "parents": [p.hex() for p in parents],
    }
    rows = ended.worker_rows
    body = b"".join(
        (
            _ENCODE(shared).encode(),
            b"\n",
            _bytes(array("d", ended.created)),
            _bytes(array("d", ended.pushed)),
            _bytes(array("d", ended.started)),
            _bytes(array("d", ended.ended)),
            _bytes(array("H", map(node_row.__getitem__, rows))),
            _bytes(array("H", map(worker_row.__getitem__, rows))),
            _bytes(array("I", map(pid.__getitem__, rows))),
            _bytes(array("I", ended.parent_rows)),
        )
    )
    return bytes(ended.ids), body, nodes


def attempts(ids: bytes) -> list[tuple[bytes, int]]:
    """(task id, attempt number) of each attempt in a piece's ids."""
    return [
        (
            ids[at : at + TASK_ID_BYTES],
            int.from_bytes(ids[at + TASK_ID_BYTES : at + ID_BYTES], "big"),
        )
        for at in range(0, len(ids), ID_BYTES)
    ]


def rows_of(ids: bytes, task_id: bytes) -> list[int]:
    """The rows of a piece's ids that are attempts of the task."""
    rows = []
    at = ids.find(task_id)
    while at >= 0:
        if at % ID_BYTES == 0:
            rows.append(at // ID_BYTES)
        at = ids.find(task_id, at + 1)
    return rows


def decode(ids: bytes, body: bytes, rows: range | list[int] | None = None) -> list[dict[str, Any]]:
    """The records of a piece's attempts (all, or those at `rows`), in the order given."""
    count = len(ids) // ID_BYTES
    newline = body.index(b"\n")
    shared = json.loads(body[:newline])
    offset = newline + 1
    times = []
    for _ in _TIME_COLUMNS:
        column, offset = _column("d", body, offset, count)
        times.append(column)
    node_rows, offset = _column("H", body, offset, count)
    worker_rows, offset = _column("H", body, offset, count)
    pids, offset = _column("I", body, offset, count)
    parent_rows, offset = _column("I", body, offset, count)
    nodes, workers = shared["nodes"], shared["workers"]
    parents = [None, *shared["parents"]]
    common = {
        key: shared[key]
        for key in ("name", "job_id", "actor_id", "required_resources")
        if shared[key] is not None
    }
    common["type"] = "ACTOR_TASK" if shared["actor_id"] else "NORMAL_TASK"
    common["state"] = "FINISHED"
    records = []
    for row in range(count) if rows is None else rows:
        start = row * ID_BYTES
        created, pushed, started, ended = (column[row] for column in times)
        record = dict(common)
        record["task_id"] = ids[start : start + TASK_ID_BYTES].hex()
        record["attempt_number"] = int.from_bytes(
            ids[start + TASK_ID_BYTES : start + ID_BYTES], "big"
        )
        record["creation_time_ms"] = int(created * 1000)
        record["submitted_time_ms"] = int((pushed or created) * 1000)
        record["start_time_ms"] = int(started * 1000)
        record["end_time_ms"] = int(ended * 1000)
        record["node_id"] = nodes[node_rows[row]]
        record["worker_id"] = workers[worker_rows[row]]
        record["worker_pid"] = pids[row]
        parent = parents[parent_rows[row]]
        if parent is not None:
            record["parent_task_id"] = parent
        records.append(record)
    return records
