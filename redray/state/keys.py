"""Redis layout of the state API: task events and user metrics (key templates and scripts).

Task events (one entry per task attempt, written by raylets in batches):
- ``te:seg``: hash ``<segment>`` -> the attempts of one job's function that one write stored,
  oldest first (a segment loses its oldest as retention drops them), in one of two forms:
  - a *piece* (most attempts: those that finished with their worker's reply, see
    columns.py): ``#<counted indexes>\t<rows dropped>\t<rows>\t<span><segment><ids>``,
    its body in ``te:rec`` under the same name; ``te:own``, a sorted set ordered by member,
    holds ``<span><segment>`` of each piece, so a task is found by its owner and counter;
    ``te:done`` (by time) the entries of attempts reported pending or running before they
    were stored in a piece, so that a report arriving late is recognised;
  - otherwise ``<counted indexes>\t<entry> <entry> ...``, each entry (``<task_id>:<attempt>``)
    a field of ``te:data``: its record, the JSON of its TaskState fields (Ray's names) with
    ``rank`` (how far it got: late reports never move it back);
- ``te:i:all``, ``te:i:job_id:<job>``, ``te:i:name:<name>``, ``te:i:node_id:<node>``,
  ``te:i:actor_id:<actor>``: lists of the segments holding such attempts, in the order they
  were stored (newest last): a write appends one element per index, not one per attempt,
  and a filter reads its index's segments and checks each record;
- ``te:i:state:<STATE>``: sorted sets (by creation time) of the entries pending, running or
  failed: entries move between them as attempts advance. Finished attempts, most of what is
  stored, are found by reading ``te:i:all``;
- ``te:counts``: hash counted index (``job_id:<job>``, ``name:<name>``, ``actor_id:<actor>``)
  -> attempts stored (exact counts for readers, and the per-job cap), and ``pieces`` ->
  attempts stored in pieces;
- ``te:indexes``: the index names; ``te:dropped``: counters of what was not kept:
  ``retention`` (past the cluster's cap: the oldest stored go), ``job_cap`` and ``job:<job>``
  (past a job's cap), ``buffer`` (lost before reaching Redis). Indexes lose the segments of
  dropped attempts as writes sweep them; readers skip what is no longer stored.

User metrics (one hash per process, removed with the process):
- ``metrics:p:<process>``: field ``<name>`` -> JSON {type, description, tag_keys, boundaries,
  series: [[tags, value]...]}, with a TTL refreshed by each flush;
- ``metrics:procs``: sorted set of process keys by last flush time.

Every key is under the cluster prefix of ``Gcs.key``; every call goes through the Gcs client
(its timeouts and retries).
"""

from __future__ import annotations

import itertools
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from redray.gcs import Gcs
from redray.state import columns

DATA = "te:data"
SEGMENTS = "te:seg"
RECORDS = "te:rec"
OWNERS = "te:own"
DONE = "te:done"
PIECE_ROWS = "pieces"  # (the field of COUNTS counting the attempts stored in pieces)
DONE_SECONDS = 300  # how long a late report of an attempt stored in a piece is recognised
COUNTS = "te:counts"
INDEX = "te:i:{name}"
INDEXES = "te:indexes"
SWEEP_CURSOR = "te:sweep"
WRITE_CHUNK = 5000  # attempts per script call
SEGMENT_ID_CHARS = 16
DROPPED = "te:dropped"
INDEXED_COLUMNS = ("state", "job_id", "name", "node_id", "actor_id")
COUNTED_COLUMNS = ("job_id", "name", "actor_id")  # (a segment's entries share these)
PIECE_MARK = b"#"  # (a segment's value that starts with it is a piece)
METRICS_PROCESS = "metrics:p:{process}"
METRICS_PROCESSES = "metrics:procs"

# States in the order an attempt goes through them (Ray's TaskStatus names); an event never
# moves an attempt back to an earlier one (events of one attempt come from several processes).
TASK_STATES = (
    "NIL",
    "PENDING_ARGS_AVAIL",
    "PENDING_NODE_ASSIGNMENT",
    "SUBMITTED_TO_WORKER",
    "RUNNING",
    "FINISHED",
    "FAILED",
)
STATE_RANK = {state: rank for rank, state in enumerate(TASK_STATES)}
TERMINAL_STATES = ("FINISHED", "FAILED")

# KEYS[1]: the task-events prefix ("<cluster prefix>te:").
# ARGV: max tasks kept, max per job, events lost before Redis (to count), then
#   n pieces (see columns.py), then n x (segment id, counted indexes ("job_id:<job>
#     name:<name> [actor_id:<actor>]": every attempt of the segment is in each), rows, its
#     entry in te:own (its span and segment id), ids, body, entries ("id id ...": its attempts
#     that may have been stored as pending or running before, and leave te:data and those
#     states' indexes; "" when none), late ("1": some were reported running by their worker,
#     whose reports may come after this), k, k more list indexes the segment joins);
#   n segments of complete entries (every event of the attempt was in this batch: nothing to
#     merge), then n x (segment id, counted indexes, "id\trecord\n..." (JSON never holds a
#     raw tab or newline), k, k more list indexes the segment joins);
#   the prefix of this write's segments of partial entries;
#   n partial entries, then n x (id, score, rank, state, json, mode, counted indexes (as a
#     segment's), node):
#     mode "r" (the attempt's end, which carries all there is to know of it) replaces what is
#     stored, mode "m" (a report of pending or running work) is merged into it without moving
#     its state back; an entry new here joins a segment of this write;
#   n scored indexes, then n x (name, "score id score id ..."), added.
_WRITE_TASK_EVENTS = r"""
local p = KEYS[1]
local data = p .. 'data'
local segs = p .. 'seg'
local recs = p .. 'rec'
local own = p .. 'own'
local done = p .. 'done'
local counts = p .. 'counts'
local max_total = tonumber(ARGV[1])
local max_job = tonumber(ARGV[2])
local lost = tonumber(ARGV[3])
local added = 0
local ranks = {__RANKS__}
local names = {}  -- list index -> true: written to now
local jobs = {}  -- job -> true: gained attempts now

-- "a b ...": its items (plain finds: no pattern matching per character).
local function split(text, from, to)
  local items = {}
  local pos = from
  while pos <= to do
    local stop = string.find(text, ' ', pos, true)
    if not stop or stop > to then stop = to + 1 end
    items[#items + 1] = string.sub(text, pos, stop - 1)
    pos = stop + 1
  end
  return items
end

local function store_segment(seg, header, ids, from)
  redis.call('HSET', segs, seg, header .. '\t' .. table.concat(ids, ' ', from or 1))
end

-- A piece's value: "#<counted>\t<rows dropped>\t<rows>\t<its entry in te:own><ids>".
local function store_piece(seg, header, skip, rows, member, ids)
  redis.call('HSET', segs, seg, '#' .. header .. '\t' .. skip .. '\t' .. rows .. '\t' .. member .. ids)
end

local function parse_piece(content)
  local t1 = string.find(content, '\t', 2, true)
  local t2 = string.find(content, '\t', t1 + 1, true)
  local t3 = string.find(content, '\t', t2 + 1, true)
  return string.sub(content, 2, t1 - 1), tonumber(string.sub(content, t1 + 1, t2 - 1)),
    tonumber(string.sub(content, t2 + 1, t3 - 1)), string.sub(content, t3 + 1, t3 + __MEMBER__),
    string.sub(content, t3 + __MEMBER__ + 1)
end

-- A segment's entries were stored: count them in its counted indexes, list it in those
-- and in the others it joins.
local function listed(seg, header, new, others)
  for _, name in ipairs(split(header, 1, #header)) do
    if new ~= 0 then
      redis.call('HINCRBY', counts, name, new)
      if string.sub(name, 1, 7) == 'job_id:' then jobs[string.sub(name, 8)] = true end
    end
    redis.call('RPUSH', p .. 'i:' .. name, seg)
    names[name] = true
  end
  for name, _ in pairs(others) do
    redis.call('RPUSH', p .. 'i:' .. name, seg)
    names[name] = true
  end
  added = added + new
end

-- The state index an entry stored in te:data is in (nil: none).
local function stored_state(old)
  if not old then return nil end
  local at = string.find(old, '"state":"', 1, true)
  if at then return string.sub(old, at + 9, string.find(old, '"', at + 9, true) - 1) end
  return nil
end

local now = tonumber(redis.call('TIME')[1])
local i = 4
local n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  local seg, header, rows, member, ids, body = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  local entries, late, k = ARGV[i + 6], ARGV[i + 7] == '1', tonumber(ARGV[i + 8])
  redis.call('ZADD', own, 0, member)
  store_piece(seg, header, 0, rows, member, ids)
  redis.call('HSET', recs, seg, body)
  redis.call('HINCRBY', counts, '__PIECE_ROWS__', rows)
  local new = rows
  if entries ~= '' then
    -- What was stored of these attempts before (pending or running) goes: they are here now.
    -- Reports from their workers (another raylet's) may still be on their way: te:done
    -- recognises them for a while.
    local ids_ = split(entries, 1, #entries)
    local by_state, gone, stored = {}, {}, redis.call('HMGET', data, unpack(ids_))
    for n, id in ipairs(ids_) do
      local state = stored_state(stored[n])
      if state then
        by_state[state] = by_state[state] or {}
        table.insert(by_state[state], id)
        gone[#gone + 1] = id
      end
      if late then redis.call('ZADD', done, now, id) end
    end
    for state, members in pairs(by_state) do redis.call('ZREM', p .. 'i:state:' .. state, unpack(members)) end
    if #gone > 0 then new = new - redis.call('HDEL', data, unpack(gone)) end
  end
  local others = {}
  for m = i + 9, i + 8 + k do others[ARGV[m]] = true end
  listed(seg, header, new, others)
  i = i + 9 + k
end
redis.call('ZREMRANGEBYSCORE', done, '-inf', now - __DONE_SECONDS__)

n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  local seg, header, text, k = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local ids, pairs_, new = {}, {}, 0
  local pos, len = 1, #text
  while pos <= len do
    local tab = string.find(text, '\t', pos, true)
    local stop = string.find(text, '\n', tab, true) or (len + 1)
    local id = string.sub(text, pos, tab - 1)
    ids[#ids + 1] = id
    pairs_[#pairs_ + 1] = id; pairs_[#pairs_ + 1] = string.sub(text, tab + 1, stop - 1)
    if #pairs_ >= 4000 then new = new + redis.call('HSET', data, unpack(pairs_)); pairs_ = {} end
    pos = stop + 1
  end
  if #pairs_ > 0 then new = new + redis.call('HSET', data, unpack(pairs_)) end
  store_segment(seg, header, ids)
  local others = {}
  for m = i + 4, i + 3 + k do others[ARGV[m]] = true end
  listed(seg, header, new, others)
  i = i + 4 + k
end

-- Partial entries new here join this write's segment of their job, name and actor; the
-- record keeps its segment's id ("seg"), so that the node it learns later lists it.
local partial_prefix = ARGV[i]; i = i + 1
local partial = {}  -- counted indexes -> {id, ids, others}
local function join(header, node, id)
  local seg = partial[header]
  if not seg then
    local count = 0
    for _ in pairs(partial) do count = count + 1 end
    seg = {id = partial_prefix .. count, ids = {}, others = {all = true}}
    partial[header] = seg
  end
  seg.ids[#seg.ids + 1] = id
  if node ~= '' then seg.others['node_id:' .. node] = true end
  return seg.id
end
local function with_segment(blob, seg)
  return string.sub(blob, 1, -2) .. ',"seg":"' .. seg .. '"}'
end
local function node_learned(old, node)
  -- A stored record without a node (reported pending) lists its segment in the node's index.
  if node == '' or string.find(old, '"node_id"', 1, true) then return end
  local seg = string.match(old, '"seg":"([^"]+)"')
  if seg then
    redis.call('RPUSH', p .. 'i:node_id:' .. node, seg)
    names['node_id:' .. node] = true
  end
end
local live = {'PENDING_ARGS_AVAIL', 'PENDING_NODE_ASSIGNMENT', 'SUBMITTED_TO_WORKER', 'RUNNING'}
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  local id, score, rank, state, blob, mode = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  local header, node = ARGV[i + 6], ARGV[i + 7]
  i = i + 8
  local old = redis.call('HGET', data, id)
  if mode == 'r' then
    -- The end of an attempt: it says all its owner and worker knew; what was stored goes.
    if not old then
      redis.call('HSET', data, id, with_segment(blob, join(header, node, id)))
    else
      node_learned(old, node)
      local seg = string.match(old, '"seg":"([^"]+)"')
      redis.call('HSET', data, id, seg and with_segment(blob, seg) or blob)
    end
    for _, s in ipairs(live) do redis.call('ZREM', p .. 'i:state:' .. s, id) end
    if state ~= 'FINISHED' then redis.call('ZADD', p .. 'i:state:' .. state, score, id) end
  elseif not old then
    -- (a report that comes after its attempt was stored finished, in a piece, is out of date)
    if not redis.call('ZSCORE', done, id) then
      redis.call('HSET', data, id, with_segment(blob, join(header, node, id)))
      redis.call('ZADD', p .. 'i:state:' .. state, score, id)
    end
  else
    node_learned(old, node)
    local rec = cjson.decode(old)
    local new = cjson.decode(blob)
    local old_rank = tonumber(rec.rank) or ranks[rec.state] or 0
    for k, v in pairs(new) do
      if k ~= 'rank' and k ~= 'state' then rec[k] = v end
    end
    if rank > old_rank then
      if rec.state then redis.call('ZREM', p .. 'i:state:' .. rec.state, id) end
      rec.rank = rank; rec.state = state
      if state ~= 'FINISHED' then
        redis.call('ZADD', p .. 'i:state:' .. state, tonumber(rec.creation_time_ms) or score, id)
      end
    end
    redis.call('HSET', data, id, cjson.encode(rec))
  end
end
for header, seg in pairs(partial) do
  store_segment(seg.id, header, seg.ids)
  listed(seg.id, header, #seg.ids, seg.others)
end

local indexed = {}
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  local key = p .. 'i:' .. ARGV[i]
  indexed[#indexed + 1] = ARGV[i]
  local members = {}
  for score, id in string.gmatch(ARGV[i + 1], '(%S+) (%S+)') do
    members[#members + 1] = score; members[#members + 1] = id
    if #members >= 4000 then redis.call('ZADD', key, unpack(members)); members = {} end
  end
  if #members > 0 then redis.call('ZADD', key, unpack(members)) end
  i = i + 2
end
for name, _ in pairs(names) do indexed[#indexed + 1] = name end
if #indexed > 0 then redis.call('SADD', p .. 'indexes', unpack(indexed)) end

-- Drop the oldest attempts of a list index (its segments hold them in the order they came)
-- until `count` are gone: whole segments, then the oldest part of one; the counts of the
-- segments' indexes go down with them. Returns how many attempts were dropped. At most
-- `budget` entries are looked at per write (the next write goes on).
local budget = 50000
local function drop_oldest(key, count)
  local dropped = 0
  while dropped < count and budget > 0 do
    local seg = redis.call('LINDEX', key, 0)
    if not seg then break end
    local content = redis.call('HGET', segs, seg)
    if not content then
      redis.call('LPOP', key)
    else
      local header, gone, finished
      if string.sub(content, 1, 1) == '#' then
        local skip, rows, member, ids
        header, skip, rows, member, ids = parse_piece(content)
        gone = math.min(rows - skip, count - dropped, budget)
        budget = budget - gone
        redis.call('HINCRBY', counts, '__PIECE_ROWS__', -gone)
        finished = skip + gone == rows
        if finished then
          redis.call('HDEL', recs, seg)
          redis.call('ZREM', own, member)
        else
          store_piece(seg, header, skip + gone, rows, member, ids)
        end
      else
        local tab = string.find(content, '\t', 1, true)
        header = string.sub(content, 1, tab - 1)
        local ids = split(content, tab + 1, #content)
        local take = math.min(#ids, count - dropped, budget)
        budget = budget - take
        gone = 0
        for s = 1, take, 4000 do
          gone = gone + redis.call('HDEL', data, unpack(ids, s, math.min(s + 3999, take)))
        end
        finished = take == #ids
        if not finished then store_segment(seg, header, ids, take + 1) end
      end
      dropped = dropped + gone
      if gone > 0 then
        for _, name in ipairs(split(header, 1, #header)) do
          if redis.call('HINCRBY', counts, name, -gone) <= 0 then redis.call('HDEL', counts, name) end
        end
      end
      if finished then
        redis.call('HDEL', segs, seg)
        redis.call('LPOP', key)
      end
    end
  end
  return dropped
end

local trimmed = false
local function count_dropped(field, dropped)
  if dropped > 0 then
    redis.call('HINCRBY', p .. 'dropped', field, dropped)
    trimmed = true
  end
end
for job, _ in pairs(jobs) do
  local over = tonumber(redis.call('HGET', counts, 'job_id:' .. job) or '0') - max_job
  if over > 0 then
    local dropped = drop_oldest(p .. 'i:job_id:' .. job, over)
    count_dropped('job_cap', dropped)
    count_dropped('job:' .. job, dropped)
  end
end
local over = redis.call('HLEN', data) + tonumber(redis.call('HGET', counts, '__PIECE_ROWS__') or '0') - max_total
if over > 0 then count_dropped('retention', drop_oldest(p .. 'i:all', over)) end
if trimmed then redis.call('SET', p .. 'trimmed', '1') end

-- Indexes lose what was dropped: the lists written to now their oldest segments no longer
-- stored, and a few other indexes per write, a list likewise and a sorted set any entry no
-- longer stored (readers skip what is gone meanwhile). No list holds more segments than
-- the cap holds attempts.
local function sweep_list(key)
  for _ = 1, 1000 do
    local seg = redis.call('LINDEX', key, 0)
    if not seg or redis.call('HEXISTS', segs, seg) == 1 then break end
    redis.call('LPOP', key)
  end
end
for name, _ in pairs(names) do
  local key = p .. 'i:' .. name
  if trimmed or redis.call('LLEN', key) > max_total then
    sweep_list(key)
    redis.call('LTRIM', key, -max_total, -1)
  end
end
if redis.call('EXISTS', p .. 'trimmed') == 1 then
  local scan = redis.call('SSCAN', p .. 'indexes', redis.call('GET', p .. 'sweep') or '0', 'COUNT', 16)
  redis.call('SET', p .. 'sweep', scan[1])
  for _, name in ipairs(scan[2]) do
    local key = p .. 'i:' .. name
    if string.sub(name, 1, 6) == 'state:' then
      for _, id in ipairs(redis.call('ZRANGE', key, 0, 199)) do
        if redis.call('HEXISTS', data, id) == 0 then redis.call('ZREM', key, id) end
      end
    else
      sweep_list(key)
    end
    if redis.call('EXISTS', key) == 0 then redis.call('SREM', p .. 'indexes', name) end
  end
end
if lost > 0 then redis.call('HINCRBY', p .. 'dropped', 'buffer', lost) end
return added
"""
for _name, _value in {
    "__RANKS__": ", ".join(f"{state} = {rank}" for state, rank in STATE_RANK.items()),
    "__MEMBER__": str(columns.SPAN_BYTES + SEGMENT_ID_CHARS),
    "__PIECE_ROWS__": PIECE_ROWS,
    "__DONE_SECONDS__": str(DONE_SECONDS),
}.items():
    _WRITE_TASK_EVENTS = _WRITE_TASK_EVENTS.replace(_name, _value)


def task_prefix(gcs: Gcs) -> str:
    return gcs.key("te:")


def entry_id(task_id: str, attempt: int) -> str:
    return f"{task_id}:{attempt}"


def is_scored(index: str) -> bool:
    """State indexes are sorted sets (entries leave them); the others are lists."""
    return index.startswith("state:")


def counted_indexes(job: str | None, name: str | None, actor: str | None) -> str:
    """The indexes whose counts an attempt of this job, function and actor is in."""
    values = zip(COUNTED_COLUMNS, (job, name, actor), strict=True)
    return " ".join(f"{column}:{value}" for column, value in values if value)


@dataclass
class Segment:
    """Complete entries of one job, function and actor that one write stores in te:data:
    lines "id\trecord" (oldest first), and the list indexes the segment joins besides those
    it counts in (see _WRITE_TASK_EVENTS)."""

    counted: str
    lines: list[str] = field(default_factory=list)
    indexes: set[str] = field(default_factory=lambda: {"all"})


@dataclass
class Piece:
    """Finished attempts of one job, function and actor stored as columns (columns.py)."""

    counted: str
    ids: bytes
    span: bytes
    body: bytes
    entries: str  # "id id ...": those that may be stored as pending or running already
    reported_running: bool  # some were reported running by their worker (reports may be late)
    indexes: set[str]

    def __len__(self) -> int:
        return len(self.ids) // columns.ID_BYTES


@dataclass
class TaskEventBatch:
    """What one write stores: see _WRITE_TASK_EVENTS for each part."""

    pieces: list[Piece] = field(default_factory=list)
    segments: dict[tuple, Segment] = field(default_factory=dict)  # (job, name, actor)
    partial: list[tuple] = field(default_factory=list)
    scored: dict[str, list[str]] = field(default_factory=dict)  # state index -> "score id"s
    lost: int = 0

    def __len__(self) -> int:
        """Attempts in the batch."""
        return (
            sum(map(len, self.pieces))
            + sum(len(s.lines) for s in self.segments.values())
            + len(self.partial)
        )

    def segment(self, job: str, name: str, actor: str | None) -> Segment:
        """The segment of the complete entries of a job's function (or actor method)."""
        found = self.segments.get((job, name, actor))
        if found is None:
            found = self.segments[(job, name, actor)] = Segment(counted_indexes(job, name, actor))
        return found

    def add_scored(self, index: str, score: float, entry: str) -> None:
        self.scored.setdefault(index, []).append(f"{score} {entry}")


def _segment_id() -> str:
    return secrets.token_hex(SEGMENT_ID_CHARS // 2)


def write_task_events(gcs: Gcs, batch: TaskEventBatch, max_tasks: int, max_per_job: int) -> int:
    """Store a batch of attempts, keep the indexes, apply the caps (one script call per
    WRITE_CHUNK attempts or so, so no call runs long); returns how many attempts were new."""
    calls = _calls(batch)
    added = 0
    for n, (pieces, segments, partial) in enumerate(calls):
        last = n == len(calls) - 1
        args: list[Any] = [max_tasks, max_per_job, batch.lost if last else 0, *pieces, *segments]
        args += (_segment_id() + ".", *partial)
        # (the state indexes go with the last call: after the records they point to)
        present = {name: members for name, members in batch.scored.items() if members and last}
        args.append(len(present))
        for name, members in present.items():
            args += (name, " ".join(members))
        added += int(gcs.run_script(_WRITE_TASK_EVENTS, [task_prefix(gcs)], args) or 0)
    return added


def _calls(batch: TaskEventBatch) -> list[tuple[list[Any], list[Any], list[Any]]]:
    """The batch cut into script calls of about WRITE_CHUNK attempts: the arguments of each
    call's pieces, segments and partial entries."""
    calls: list[tuple[list[Any], list[Any], list[Any]]] = []
    pieces: list[Any] = []
    count = size = 0
    for piece in batch.pieces:
        if size and size + len(piece) > WRITE_CHUNK:
            calls.append(([count, *pieces], [0], [0]))
            pieces, count, size = [], 0, 0
        segment = _segment_id()
        member = piece.span + segment.encode()
        pieces += (segment, piece.counted, len(piece), member, piece.ids, piece.body)
        pieces += (piece.entries, "1" if piece.reported_running else "")
        pieces += (len(piece.indexes), *piece.indexes)
        count += 1
        size += len(piece)
    segments: list[Any] = []
    count_segments = 0
    for segment in batch.segments.values():
        for start in range(0, len(segment.lines), WRITE_CHUNK):
            lines = segment.lines[start : start + WRITE_CHUNK]
            if size and size + len(lines) > WRITE_CHUNK:
                calls.append(([count, *pieces], [count_segments, *segments], [0]))
                pieces, segments, count, count_segments, size = [], [], 0, 0, 0
            segments += (_segment_id(), segment.counted, "\n".join(lines))
            segments += (len(segment.indexes), *segment.indexes)
            count_segments += 1
            size += len(lines)
    if count or count_segments:
        calls.append(([count, *pieces], [count_segments, *segments], [0]))
    for start in range(0, len(batch.partial), WRITE_CHUNK):
        part = batch.partial[start : start + WRITE_CHUNK]
        values = (value for partial in part for value in partial)
        calls.append(([0], [0], [len(part), *values]))
    return calls or [([0], [0], [0])]


def index_key(gcs: Gcs, column: str, value: str | None = None) -> str:
    """The index of attempts whose `column` is `value` (column "all": no value)."""
    name = column if value is None else f"{column}:{value}"
    return gcs.key(INDEX, name=name)


def index_name(gcs: Gcs, key: str) -> str:
    """The name of the index at `key` ("all", "name:<name>", ...)."""
    return key[len(gcs.key(INDEX, name="")) :]


def is_scored_key(gcs: Gcs, key: str) -> bool:
    return is_scored(index_name(gcs, key))


def index_page(gcs: Gcs, key: str, start: int, count: int) -> tuple[list[dict[str, Any]], int]:
    """Records of an index's attempts still stored, newest first, at its `count` positions
    from `start` (a list's positions are segments of attempts, and may repeat one); and how
    many positions there were."""
    if is_scored_key(gcs, key):
        raw = gcs.redis.zrevrange(key, start, start + count - 1)
        records = read_tasks(gcs, [r.decode() for r in raw])
        return [r for r in records if r is not None], len(raw)
    segments = gcs.redis.lrange(key, -(start + count), -(start + 1))
    if not segments:
        return [], 0
    segments.reverse()
    return read_segments(gcs, segments), len(segments)


def _piece(content: bytes) -> tuple[int, bytes]:
    """(rows dropped, ids) of a piece's segment value (see _WRITE_TASK_EVENTS)."""
    _, skip, _, rest = content[1:].split(b"\t", 3)
    return int(skip), rest[columns.SPAN_BYTES + SEGMENT_ID_CHARS :]


def read_segments(gcs: Gcs, segments: list[bytes]) -> list[dict[str, Any]]:
    """The records of these segments' attempts still stored, each segment's newest first."""
    contents = gcs.redis.hmget(gcs.key(SEGMENTS), segments)
    pieces = [s for s, c in zip(segments, contents, strict=True) if c and c[:1] == PIECE_MARK]
    bodies: dict[bytes, bytes | None] = {}
    if pieces:
        bodies = dict(zip(pieces, gcs.redis.hmget(gcs.key(RECORDS), pieces), strict=True))
    entries: list[str] = []  # of the other segments, newest first
    for content in contents:
        if content and content[:1] != PIECE_MARK:  # "counted\tid id ...", oldest first
            ids = content.decode().split("\t", 1)[1].split(" ")
            entries += reversed(ids)
    stored = iter(read_tasks(gcs, entries))
    records: list[dict[str, Any]] = []
    for segment, content in zip(segments, contents, strict=True):
        if not content:
            continue
        if content[:1] != PIECE_MARK:
            count = content.count(b" ") + 1
            records += (r for r in itertools.islice(stored, count) if r is not None)
            continue
        body = bodies.get(segment)
        if body:
            skip, ids = _piece(content)
            rows = range(len(ids) // columns.ID_BYTES - 1, skip - 1, -1)
            records += columns.decode(ids, body, rows)
    return records


def index_sizes(gcs: Gcs, keys: list[str]) -> list[int]:
    """Attempts in each index: exact for the state, job, name and actor indexes, the
    segments of a node's (whose segments also hold other nodes' attempts)."""
    names = [index_name(gcs, key) for key in keys]
    commands: list[tuple] = []
    for key, name in zip(keys, names, strict=True):
        if is_scored(name):
            commands.append(("ZCARD", key))
        elif name.split(":", 1)[0] in COUNTED_COLUMNS:
            commands.append(("HGET", gcs.key(COUNTS), name))
        elif name == "all":  # (attempts in te:data, and in pieces)
            commands.append(("HLEN", gcs.key(DATA)))
            commands.append(("HGET", gcs.key(COUNTS), PIECE_ROWS))
        else:
            commands.append(("LLEN", key))
    replies = iter([int(r or 0) for r in gcs.round_trip(*commands)])
    return [next(replies) + next(replies) if n == "all" else next(replies) for n in names]


def index_is_exact(name: str) -> bool:
    """Whether index_sizes counts this index's attempts exactly."""
    return is_scored(name) or name == "all" or name.split(":", 1)[0] in COUNTED_COLUMNS


def read_tasks(gcs: Gcs, entries: list[str]) -> list[dict[str, Any] | None]:
    """The records of attempts stored in te:data (None for those no longer stored)."""
    if not entries:
        return []
    raw = gcs.redis.hmget(gcs.key(DATA), entries)
    records = [json.loads(blob) if blob else None for blob in raw]
    # (a record that is not an object was stored by an older version: not read)
    return [r if type(r) is dict else None for r in records]


def read_attempts(gcs: Gcs, task_id: str, most: int = 64) -> list[dict[str, Any]]:
    """The records of a task's stored attempts (hex id), in attempt order."""
    entries = [entry_id(task_id, n) for n in range(most)]
    records = {n: r for n, r in enumerate(read_tasks(gcs, entries)) if r is not None}
    try:
        binary = bytes.fromhex(task_id)
    except ValueError:
        binary = b""
    if len(binary) == columns.TASK_ID_BYTES:
        for record in _located(gcs, binary):
            records[record["attempt_number"]] = record
    return [records[n] for n in sorted(records)]


def _located(gcs: Gcs, task_id: bytes, page: int = 256) -> list[dict[str, Any]]:
    """The records of a task's attempts stored in pieces (found by the task's owner and
    counter: see columns.py)."""
    high, low = columns.search_bounds(task_id)
    candidates: list[bytes] = []
    offset = 0
    while True:
        members = gcs.redis.zrevrangebylex(gcs.key(OWNERS), high, low, offset, page)
        span = columns.SPAN_BYTES
        candidates += (m[span:] for m in members if columns.may_hold(m[:span], task_id))
        if len(members) < page:
            break
        offset += page
    if not candidates:
        return []
    contents, bodies = gcs.round_trip(
        ("HMGET", gcs.key(SEGMENTS), *candidates), ("HMGET", gcs.key(RECORDS), *candidates)
    )
    records: list[dict[str, Any]] = []
    for content, body in zip(contents, bodies, strict=True):
        if content and body:
            skip, ids = _piece(content)
            rows = [row for row in columns.rows_of(ids, task_id) if row >= skip]
            records += columns.decode(ids, body, rows)
    return records


def dropped_counts(gcs: Gcs) -> dict[str, int]:
    raw = gcs.redis.hgetall(gcs.key(DROPPED))
    return {k.decode(): int(v) for k, v in raw.items()}


def task_count(gcs: Gcs) -> int:
    """Attempts stored."""
    return index_sizes(gcs, [index_key(gcs, "all")])[0]


# -- user metrics -------------------------------------------------------------------------
def write_metrics(
    gcs: Gcs, process: str, labels: dict[str, str], metrics: dict[str, Any], ttl: float
) -> None:
    """Replace one process's metrics (one round trip); they expire `ttl` s after the last
    write, so a process that died leaves nothing behind for long."""
    key = gcs.key(METRICS_PROCESS, process=process)
    commands: list[tuple] = [("DEL", key)]
    flat: list[str] = ["__labels__", json.dumps(labels)]
    for name, value in metrics.items():
        flat += [name, json.dumps(value, separators=(",", ":"))]
    commands.append(("HSET", key, *flat))
    commands.append(("PEXPIRE", key, int(ttl * 1000)))
    commands.append(("ZADD", gcs.key(METRICS_PROCESSES), time.time(), process))
    gcs.round_trip(("MULTI",), *commands, ("EXEC",))


def remove_metrics(gcs: Gcs, process: str) -> None:
    gcs.round_trip(
        ("DEL", gcs.key(METRICS_PROCESS, process=process)),
        ("ZREM", gcs.key(METRICS_PROCESSES), process),
    )


def read_metrics_raw(gcs: Gcs) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """(labels, {metric name: record}) of every process whose metrics have not expired;
    expired processes are dropped from the process index on the way."""
    index = gcs.key(METRICS_PROCESSES)
    processes = [p.decode() for p in gcs.redis.zrange(index, 0, -1)]
    if not processes:
        return []
    replies = gcs.round_trip(*(("HGETALL", gcs.key(METRICS_PROCESS, process=p)) for p in processes))
    out = []
    gone = []
    for process, reply in zip(processes, replies, strict=True):
        if isinstance(reply, list):
            it = iter(reply)
            reply = dict(zip(it, it, strict=False))
        if not reply:
            gone.append(process)
            continue
        fields = {k.decode(): json.loads(v) for k, v in reply.items()}
        labels = fields.pop("__labels__", {})
        out.append((labels, fields))
    if gone:
        gcs.redis.zrem(index, *gone)
    return out
