"""Redis layout of the state API: task events and user metrics (key templates and scripts).

Task events (one entry per task attempt, written by raylets in batches):
- ``te:data``: hash ``<task_id>:<attempt>`` -> JSON of its TaskState fields (Ray's names),
  with ``rank`` (how far it got: late reports never move it back); a record stored complete
  (its attempt ended before anything of it was reported) leaves out what its entry and state
  say (task id, attempt number, rank, type);
- ``te:i:all``, ``te:i:job_id:<job>``, ``te:i:name:<name>``, ``te:i:node_id:<node>``,
  ``te:i:actor_id:<actor>``: lists of entries in the order they were stored (newest last;
  an entry reported before it ended may appear twice), so a filter on one of these columns
  reads its index instead of scanning; appending to a list costs Redis a fraction of a
  sorted-set insert, which matters at tens of thousands of tasks per second;
- ``te:i:state:<STATE>``: sorted sets (by creation time) of the attempts pending, running or
  failed: entries move between them as attempts advance. Finished attempts, most of what is
  stored, are found by reading ``te:i:all``;
- ``te:indexes``: the index names; ``te:dropped``: counters of what was not kept:
  ``retention`` (past the cluster's cap: the oldest stored go), ``job_cap`` and ``job:<job>``
  (past a job's cap), ``buffer`` (lost before reaching Redis). Indexes lose the entries of
  dropped attempts a few keys per write; readers skip entries no longer stored.

User metrics (one hash per process, removed with the process):
- ``metrics:p:<process>``: field ``<name>`` -> JSON {type, description, tag_keys, boundaries,
  series: [[tags, value]...]}, with a TTL refreshed by each flush;
- ``metrics:procs``: sorted set of process keys by last flush time.

Every key is under the cluster prefix of ``Gcs.key``; every call goes through the Gcs client
(its timeouts and retries).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from redray.gcs import Gcs

DATA = "te:data"
INDEX = "te:i:{name}"
INDEXES = "te:indexes"
SWEEP_CURSOR = "te:sweep"
WRITE_CHUNK = 5000  # attempts per script call
DROPPED = "te:dropped"
INDEXED_COLUMNS = ("state", "job_id", "name", "node_id", "actor_id")
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
#   n complete entries (every event of the attempt was in this batch: nothing to merge), then
#     their n ids, then their n JSON records (each argument apart: no parsing in Lua);
#   n partial entries, then n x (id, score, rank, state, json, mode, job, name, node, actor):
#     mode "r" (the attempt's end, which carries all there is to know of it) replaces what is
#     stored, mode "m" (a report of pending or running work) is merged into it without moving
#     its state back; the entry joins the list indexes of its columns when it is new;
#   n list indexes, then n x (name, members) appended (newest last): members "*" for every
#     complete entry (the usual case: one function, job and node per batch), else "id id ...";
#   n scored indexes, then n x (name, "score id score id ..."), added;
#   n jobs touched (their caps are checked), the jobs.
_WRITE_TASK_EVENTS = r"""
local p = KEYS[1]
local data = p .. 'data'
local max_total = tonumber(ARGV[1])
local max_job = tonumber(ARGV[2])
local lost = tonumber(ARGV[3])
local added = 0
local ranks = {__RANKS__}

local n_complete = tonumber(ARGV[4])
local first_id = 5
local first_blob = first_id + n_complete
for s = 0, n_complete - 1, 2000 do
  local pairs_ = {}
  for k = s, math.min(s + 1999, n_complete - 1) do
    pairs_[#pairs_ + 1] = ARGV[first_id + k]; pairs_[#pairs_ + 1] = ARGV[first_blob + k]
  end
  added = added + redis.call('HSET', data, unpack(pairs_))
end

local i = first_blob + n_complete
local n = tonumber(ARGV[i]); i = i + 1
local live = {'PENDING_ARGS_AVAIL', 'PENDING_NODE_ASSIGNMENT', 'SUBMITTED_TO_WORKER', 'RUNNING'}
local columns = {'job_id', 'name', 'node_id', 'actor_id'}
local pushed = {}
local function push(column, value, id)
  if value ~= '' then
    local name = column .. ':' .. value
    redis.call('RPUSH', p .. 'i:' .. name, id)
    pushed[name] = true
  end
end
for j = 1, n do
  local id, score, rank, state, blob, mode = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  local values = {ARGV[i + 6], ARGV[i + 7], ARGV[i + 8], ARGV[i + 9]}
  i = i + 10
  local old = nil
  if mode == 'm' then old = redis.call('HGET', data, id) end
  if mode == 'r' then
    -- The end of an attempt: it says all its owner and worker knew; what was stored goes.
    if redis.call('HSET', data, id, blob) == 1 then
      added = added + 1
      redis.call('RPUSH', p .. 'i:all', id)
      for c = 1, 4 do push(columns[c], values[c], id) end
    else
      push('node_id', values[3], id)  -- (a report of pending work has no node)
    end
    for _, s in ipairs(live) do redis.call('ZREM', p .. 'i:state:' .. s, id) end
    if state ~= 'FINISHED' then redis.call('ZADD', p .. 'i:state:' .. state, score, id) end
  elseif not old then
    redis.call('HSET', data, id, blob)
    added = added + 1
    redis.call('RPUSH', p .. 'i:all', id)
    for c = 1, 4 do push(columns[c], values[c], id) end
    redis.call('ZADD', p .. 'i:state:' .. state, score, id)
  else
    local rec = cjson.decode(old)
    local new = cjson.decode(blob)
    if not rec.node_id and new.node_id then push('node_id', new.node_id, id) end
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

local names = {}
n = tonumber(ARGV[i]); i = i + 1
for j = 1, n do
  local key = p .. 'i:' .. ARGV[i]
  names[#names + 1] = ARGV[i]
  if ARGV[i + 1] == '*' then
    for s = 0, n_complete - 1, 4000 do
      redis.call('RPUSH', key, unpack(ARGV, first_id + s, first_id + math.min(s + 3999, n_complete - 1)))
    end
  else
    local members = {}
    for id in string.gmatch(ARGV[i + 1], '%S+') do
      members[#members + 1] = id
      if #members >= 4000 then redis.call('RPUSH', key, unpack(members)); members = {} end
    end
    if #members > 0 then redis.call('RPUSH', key, unpack(members)) end
  end
  i = i + 2
end
n = tonumber(ARGV[i]); i = i + 1
for j = 1, n do
  local key = p .. 'i:' .. ARGV[i]
  names[#names + 1] = ARGV[i]
  local members = {}
  for score, id in string.gmatch(ARGV[i + 1], '(%S+) (%S+)') do
    members[#members + 1] = score; members[#members + 1] = id
    if #members >= 4000 then redis.call('ZADD', key, unpack(members)); members = {} end
  end
  if #members > 0 then redis.call('ZADD', key, unpack(members)) end
  i = i + 2
end
for name, _ in pairs(pushed) do names[#names + 1] = name end
if #names > 0 then redis.call('SADD', p .. 'indexes', unpack(names)) end

-- Drop the oldest entries of a list index (kept in the order they came): `count` of them
-- (`exact`), or until `count` stored attempts are gone (entries already gone are skipped).
-- Returns how many attempts were dropped. At most `budget` entries are looked at per write
-- (the next write goes on).
local budget = 20000
local function drop_oldest(key, count, exact)
  local dropped = 0
  while count > 0 and budget > 0 do
    local take = math.min(count, 1000, budget)
    budget = budget - take
    local ids = redis.call('LPOP', key, take)
    if not ids then break end
    -- (an entry may be listed twice: HDEL counts what it removed)
    local gone = redis.call('HDEL', data, unpack(ids))
    dropped = dropped + gone
    if exact then count = count - #ids else count = count - gone end
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
n = tonumber(ARGV[i]); i = i + 1
for j = 1, n do
  local job = ARGV[i]; i = i + 1
  local key = p .. 'i:job_id:' .. job
  local over = redis.call('LLEN', key) - max_job
  if over > 0 then
    local dropped = drop_oldest(key, over, true)
    count_dropped('job_cap', dropped)
    count_dropped('job:' .. job, dropped)
  end
end
local over = redis.call('HLEN', data) - max_total
if over > 0 then count_dropped('retention', drop_oldest(p .. 'i:all', over, false)) end
-- No list index outgrows the cap (entries of attempts dropped by the job cap stay in the
-- others until swept): past it, its oldest entries go, with their attempts.
for _, name in ipairs(names) do
  if string.sub(name, 1, 6) ~= 'state:' then
    local key = p .. 'i:' .. name
    local excess = redis.call('LLEN', key) - max_total
    if excess > 0 then count_dropped('retention', drop_oldest(key, excess, true)) end
  end
end
if trimmed then redis.call('SET', p .. 'trimmed', '1') end

-- Indexes lose the entries of dropped attempts: the lists written to now their stale oldest
-- (a list's entries are in the order they came), and a few other indexes per write, a
-- list its stale oldest and a sorted set any (readers skip entries no longer stored).
local function sweep_list(key)
  local swept = 0
  while swept < 20000 do
    local head = redis.call('LINDEX', key, 0)
    if not head or redis.call('HEXISTS', data, head) == 1 then break end
    local ids = redis.call('LRANGE', key, 0, 255)
    local stored = redis.call('HMGET', data, unpack(ids))
    local gone = #ids
    for k = 1, #ids do
      if stored[k] then gone = k - 1; break end
    end
    redis.call('LTRIM', key, gone, -1)
    swept = swept + gone
    if gone < #ids then break end
  end
end
if redis.call('EXISTS', p .. 'trimmed') == 1 then
  for _, name in ipairs(names) do
    if string.sub(name, 1, 6) ~= 'state:' then sweep_list(p .. 'i:' .. name) end
  end
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
""".replace("__RANKS__", ", ".join(f"{state} = {rank}" for state, rank in STATE_RANK.items()))


def task_prefix(gcs: Gcs) -> str:
    return gcs.key("te:")


def entry_id(task_id: str, attempt: int) -> str:
    return f"{task_id}:{attempt}"


def is_scored(index: str) -> bool:
    """State indexes are sorted sets (entries leave them); the others are lists."""
    return index.startswith("state:")


@dataclass
class TaskEventBatch:
    """What one write stores: see _WRITE_TASK_EVENTS for each part."""

    ids: list[str] = field(default_factory=list)  # complete entries...
    blobs: list[str] = field(default_factory=list)  # ...and their JSON records
    partial: list[tuple] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)  # list index -> ids
    scored: dict[str, list[str]] = field(default_factory=dict)  # state index -> "score id"s
    jobs: set[str] = field(default_factory=set)
    lost: int = 0

    def members(self, index: str) -> list[str]:
        """The list to append the ids of `index` to."""
        found = self.groups.get(index)
        if found is None:
            found = self.groups[index] = []
        return found

    def add_scored(self, index: str, score: float, entry: str) -> None:
        self.scored.setdefault(index, []).append(f"{score} {entry}")

    def add_complete(self, ids: list[str], blobs: list[str], groups: dict[str, list[str]]):
        """Complete entries formatted elsewhere (by the processes that recorded them)."""
        self.ids += ids
        self.blobs += blobs
        for name, members in groups.items():
            self.members(name).extend(members)


def write_task_events(gcs: Gcs, batch: TaskEventBatch, max_tasks: int, max_per_job: int) -> int:
    """Store a batch of attempts, keep the indexes, apply the caps (one script call per
    WRITE_CHUNK attempts, so no call runs long); returns how many attempts were new."""
    if len(batch.ids) + len(batch.partial) > WRITE_CHUNK:
        return sum(
            _write(gcs, part, max_tasks, max_per_job) for part in _chunks(batch, WRITE_CHUNK)
        )
    return _write(gcs, batch, max_tasks, max_per_job)


def _chunks(batch: TaskEventBatch, size: int) -> list[TaskEventBatch]:
    """A batch cut in parts of at most `size` attempts (the index members follow theirs)."""
    parts: list[TaskEventBatch] = []
    owner: dict[str, TaskEventBatch] = {}
    for start in range(0, len(batch.ids), size):
        part = TaskEventBatch(jobs=set(batch.jobs))
        part.ids = batch.ids[start : start + size]
        part.blobs = batch.blobs[start : start + size]
        owner.update(dict.fromkeys(part.ids, part))
        parts.append(part)
    for start in range(0, len(batch.partial), size):
        part = TaskEventBatch(jobs=set(batch.jobs))
        part.partial = batch.partial[start : start + size]
        owner.update((item[0], part) for item in part.partial)
        parts.append(part)
    for name, members in batch.groups.items():
        for entry in members:
            owner[entry].members(name).append(entry)
    for name, members in batch.scored.items():
        for member in members:
            owner[member.split(" ", 1)[1]].scored.setdefault(name, []).append(member)
    parts[-1].lost = batch.lost
    return parts


def _write(gcs: Gcs, batch: TaskEventBatch, max_tasks: int, max_per_job: int) -> int:
    if not (batch.ids or batch.partial or batch.lost):
        return 0
    ids = batch.ids
    args: list[Any] = [max_tasks, max_per_job, batch.lost, len(ids), *ids, *batch.blobs]
    args.append(len(batch.partial))
    for partial in batch.partial:
        args += partial
    present = {name: members for name, members in batch.groups.items() if members}
    args.append(len(present))
    for name, members in present.items():
        args += (name, "*" if members == ids else " ".join(members))
    present = {name: members for name, members in batch.scored.items() if members}
    args.append(len(present))
    for name, members in present.items():
        args += (name, " ".join(members))
    args.append(len(batch.jobs))
    args += batch.jobs
    return int(gcs.run_script(_WRITE_TASK_EVENTS, [task_prefix(gcs)], args) or 0)


def index_key(gcs: Gcs, column: str, value: str | None = None) -> str:
    """The index of attempts whose `column` is `value` (column "all": no value)."""
    name = column if value is None else f"{column}:{value}"
    return gcs.key(INDEX, name=name)


def index_page(gcs: Gcs, key: str, start: int, count: int) -> list[str]:
    """Entries of an index, newest first, from position start (lists may repeat one)."""
    if is_scored(key[len(gcs.key(INDEX, name="")) :]):
        raw = gcs.redis.zrevrange(key, start, start + count - 1)
    else:
        raw = gcs.redis.lrange(key, -(start + count), -(start + 1))
        raw.reverse()
    return [r.decode() for r in raw]


def index_sizes(gcs: Gcs, keys: list[str]) -> list[int]:
    prefix = len(gcs.key(INDEX, name=""))
    replies = gcs.round_trip(
        *(("ZCARD" if is_scored(key[prefix:]) else "LLEN", key) for key in keys)
    )
    return [int(r or 0) for r in replies]


def read_tasks(gcs: Gcs, entries: list[str]) -> list[dict[str, Any] | None]:
    """The stored record of each attempt (None for attempts no longer stored)."""
    if not entries:
        return []
    raw = gcs.redis.hmget(gcs.key(DATA), entries)
    records: list[dict[str, Any] | None] = []
    for entry, blob in zip(entries, raw, strict=True):
        if not blob:
            records.append(None)
            continue
        record = json.loads(blob)
        if "task_id" not in record:  # a complete record leaves out what its entry says
            task_id, _, attempt = entry.rpartition(":")
            record["task_id"] = task_id
            record["attempt_number"] = int(attempt)
            record["type"] = "ACTOR_TASK" if record.get("actor_id") else "NORMAL_TASK"
        records.append(record)
    return records


def attempts_of(gcs: Gcs, task_id: str, most: int = 64) -> list[str]:
    """The stored attempts of a task (entries), in attempt order."""
    entries = [entry_id(task_id, n) for n in range(most)]
    raw = gcs.redis.hmget(gcs.key(DATA), entries)
    return [e for e, blob in zip(entries, raw, strict=True) if blob]


def dropped_counts(gcs: Gcs) -> dict[str, int]:
    raw = gcs.redis.hgetall(gcs.key(DROPPED))
    return {k.decode(): int(v) for k, v in raw.items()}


def task_count(gcs: Gcs) -> int:
    return int(gcs.redis.hlen(gcs.key(DATA)))


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
