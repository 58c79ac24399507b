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
import operator
import sys
from array import array
from typing import Any

from redray.core.ids import COUNTER_BYTES, OWNER_BYTES, TASK_ID_BYTES

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


def _table(values: tuple) -> tuple[list, array]:
    """The distinct values (in order of appearance) and each row's position among them."""
    distinct = list(dict.fromkeys(values))
    position = {value: n for n, value in enumerate(distinct)}
    return distinct, array("H", map(position.__getitem__, values))


def _counter(task_id: bytes) -> int:
    return int.from_bytes(task_id[OWNER_BYTES:], "big")


def cut(events: list[tuple], most: int) -> list[list[tuple]]:
    """End events as the events of pieces of at most `most` attempts, each of one owner
    whose task counters lie within SPAN (in the order given, unless they must be cut)."""
    task_ids = [e[1] for e in events]
    low, high = min(task_ids), max(task_ids)
    if low[:OWNER_BYTES] == high[:OWNER_BYTES] and _counter(high) - _counter(low) <= SPAN:
        return [events[start : start + most] for start in range(0, len(events), most)]
    events = sorted(events, key=operator.itemgetter(1))
    pieces: list[list[tuple]] = []
    first = 0
    low = events[0][1]
    for n, event in enumerate(events):
        task_id = event[1]
        if (
            n - first >= most
            or task_id[:OWNER_BYTES] != low[:OWNER_BYTES]
            or _counter(task_id) - _counter(low) > SPAN
        ):
            pieces.append(events[first:n])
            first, low = n, task_id
    pieces.append(events[first:])
    return pieces


def span_of(events: list[tuple]) -> bytes:
    """The span of a piece of these end events: their owner, their lowest task counter and
    their highest (see above)."""
    task_ids = [e[1] for e in events]
    return min(task_ids) + max(task_ids)[OWNER_BYTES:]


def search_bounds(task_id: bytes) -> tuple[bytes, bytes]:
    """(highest, lowest): ZREVRANGEBYLEX bounds of the spans of the pieces that may hold the
    task (the same owner, the lowest counter at most the task's and at most SPAN below)."""
    counter = _counter(task_id)
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


def encode(events: list[tuple], resources_json: str | None) -> tuple[bytes, bytes, list[str]]:
    """(ids, body, nodes) of a piece holding these end events (events.FINISHED tuples of one
    owner's calls of one job's function, each with its worker's run info); ValueError if a
    task id is not a task id (of TASK_ID_BYTES)."""
    columns = list(zip(*events, strict=True))
    task_ids, attempts = columns[1], columns[2]
    try:
        suffixes = list(map(_ATTEMPTS.__getitem__, attempts))
    except IndexError:  # (an attempt numbered 256 or more)
        suffixes = [n.to_bytes(ATTEMPT_BYTES, "big") for n in attempts]
    ids = b"".join(map(bytes.__add__, task_ids, suffixes))
    if len(ids) != len(events) * ID_BYTES:
        raise ValueError("task ids of another length")
    runs = list(zip(*columns[11], strict=True))  # (started, reported, node, worker, pid)
    nodes, node_rows = _table(runs[2])
    workers, worker_rows = _table(runs[3])
    parents = [p for p in dict.fromkeys(columns[9]) if p is not None]
    parent_row = {p: n for n, p in enumerate(parents, 1)}
    parent_row[None] = 0
    first = events[0]
    shared = {
        "name": first[6],
        "job_id": first[7],
        "actor_id": first[8].hex() if first[8] else None,
        "required_resources": resources_json,
        "nodes": nodes,
        "workers": workers,
        "parents": [p.hex() for p in parents],
    }
    body = b"".join(
        (
            _ENCODE(shared).encode(),
            b"\n",
            _bytes(array("d", columns[3])),
            _bytes(array("d", [p or 0.0 for p in columns[4]])),
            _bytes(array("d", runs[0])),
            _bytes(array("d", columns[5])),
            _bytes(node_rows),
            _bytes(worker_rows),
            _bytes(array("I", runs[4])),
            _bytes(array("I", map(parent_row.__getitem__, columns[9]))),
        )
    )
    return ids, body, nodes


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
