"""Redis layout of the state API: task events and user metrics (key templates and scripts).

Task events (one entry per task attempt, written by raylets in batches):
- ``te:data``: hash ``<task_id>:<attempt>`` -> JSON of its TaskState fields (Ray's names),
  with ``rank`` (how far it got: late events never move it back) and ``ts`` (state -> ms);
- ``te:i:all``, ``te:i:state:<STATE>``, ``te:i:job_id:<job>``, ``te:i:name:<name>``,
  ``te:i:node_id:<node>``, ``te:i:actor_id:<actor>``: sorted sets of entries by creation
  time (ms), so a filter on any of these columns reads its index instead of scanning;
  ``te:indexes`` lists them (without the prefix);
- retention: past ``max_tasks`` the oldest entries are deleted from ``te:data`` and
  ``te:i:all``; ``te:cutoff`` holds the creation time below which entries are gone, and the
  other indexes are swept down to it a few keys per write (readers skip what is gone);
- ``te:dropped``: counters of what was not kept: ``retention`` (past the cluster's cap),
  ``job_cap`` (past a job's cap) and ``job:<job>``, ``buffer`` (lost before reaching Redis).

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
CUTOFF = "te:cutoff"
SWEEP_CURSOR = "te:sweep"
DROPPED = "te:dropped"
INDEXED_COLUMNS = ("state", "job_id", "name", "node_id", "actor_id")
METRICS_PROCESS = "metrics:p:{process}"
METRICS_PROCESSES = "metrics:procs"
SWEEP_KEYS_PER_WRITE = 64

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
#   complete entries (every event of the attempt was in this batch: nothing to merge), as one
#     string "id\tjson\n..." (JSON never holds a raw tab or newline);
#   n partial entries, then n x (id, score, rank, state, json, mode): mode "r" (the attempt's
#     end, which carries all there is to know of it) replaces what is stored, mode "m" (a
#     report of pending or running work) is merged into it without moving its state back;
#   n index groups, then n x (name, "score id score id ..."), added as they are;
#   n jobs touched (their caps are checked), the jobs; and the sweep's budget.
_WRITE_TASK_EVENTS = r"""
local p = KEYS[1]
local data = p .. 'data'
local max_total = tonumber(ARGV[1])
local max_job = tonumber(ARGV[2])
local lost = tonumber(ARGV[3])
local added = 0

local function flush_hset(args)
  if #args > 0 then added = added + redis.call('HSET', data, unpack(args)) end
end
local args = {}
for id, blob in string.gmatch(ARGV[4], '([^\t\n]+)\t([^\n]+)') do
  args[#args + 1] = id; args[#args + 1] = blob
  if #args >= 4000 then flush_hset(args); args = {} end
end
flush_hset(args)

local i = 5
local n = tonumber(ARGV[i]); i = i + 1
local live = {'PENDING_ARGS_AVAIL', 'PENDING_NODE_ASSIGNMENT', 'SUBMITTED_TO_WORKER', 'RUNNING'}
for j = 1, n do
  local id, score, rank, state, blob, mode = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  i = i + 6
  local old = nil
  if mode == 'm' then old = redis.call('HGET', data, id) end
  if mode == 'r' then
    -- The end of an attempt: it says all its owner and worker knew; what was stored goes.
    added = added + redis.call('HSET', data, id, blob)
    for _, s in ipairs(live) do redis.call('ZREM', p .. 'i:state:' .. s, id) end
    if state ~= 'FINISHED' then redis.call('ZADD', p .. 'i:state:' .. state, score, id) end
  elseif not old then
    redis.call('HSET', data, id, blob)
    added = added + 1
    redis.call('ZADD', p .. 'i:state:' .. state, score, id)
  else
    local rec = cjson.decode(old)
    local new = cjson.decode(blob)
    local old_rank = tonumber(rec.rank) or 0
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

n = tonumber(ARGV[i]); i = i + 1
local names = {}
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
if #names > 0 then redis.call('SADD', p .. 'indexes', unpack(names)) end

-- The cluster's cap: drop the oldest entries; other indexes are swept down to the cutoff.
local over = redis.call('ZCARD', p .. 'i:all') - max_total
if over > 0 then
  local victims = redis.call('ZRANGE', p .. 'i:all', 0, over - 1, 'WITHSCORES')
  local ids = {}
  for j = 1, #victims, 2 do ids[#ids + 1] = victims[j] end
  for j = 1, #ids, 4000 do
    redis.call('HDEL', data, unpack(ids, j, math.min(j + 3999, #ids)))
  end
  redis.call('ZREMRANGEBYRANK', p .. 'i:all', 0, over - 1)
  redis.call('SET', p .. 'cutoff', victims[#victims])
  redis.call('HINCRBY', p .. 'dropped', 'retention', #ids)
end
local cutoff = redis.call('GET', p .. 'cutoff')
if cutoff then
  local cursor = redis.call('GET', p .. 'sweep') or '0'
  local scan = redis.call('SSCAN', p .. 'indexes', cursor, 'COUNT', ARGV[#ARGV])
  redis.call('SET', p .. 'sweep', scan[1])
  for _, name in ipairs(scan[2]) do
    local key = p .. 'i:' .. name
    redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. cutoff)
    if redis.call('EXISTS', key) == 0 then redis.call('SREM', p .. 'indexes', name) end
  end
end

-- A job's cap: its oldest entries go, from every index they are in.
n = tonumber(ARGV[i]); i = i + 1
for j = 1, n do
  local job = ARGV[i]; i = i + 1
  local key = p .. 'i:job_id:' .. job
  if cutoff then redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. cutoff) end
  local excess = redis.call('ZCARD', key) - max_job
  if excess > 0 then
    local ids = redis.call('ZRANGE', key, 0, excess - 1)
    for _, id in ipairs(ids) do
      local blob = redis.call('HGET', data, id)
      if blob then
        local rec = cjson.decode(blob)
        for _, col in ipairs({'state', 'name', 'node_id', 'actor_id'}) do
          if rec[col] then redis.call('ZREM', p .. 'i:' .. col .. ':' .. rec[col], id) end
        end
        redis.call('HDEL', data, id)
      end
      redis.call('ZREM', p .. 'i:all', id)
    end
    redis.call('ZREMRANGEBYRANK', key, 0, excess - 1)
    redis.call('HINCRBY', p .. 'dropped', 'job_cap', #ids)
    redis.call('HINCRBY', p .. 'dropped', 'job:' .. job, #ids)
  end
end
if lost > 0 then redis.call('HINCRBY', p .. 'dropped', 'buffer', lost) end
return added
"""


def task_prefix(gcs: Gcs) -> str:
    return gcs.key("te:")


def entry_id(task_id: str, attempt: int) -> str:
    return f"{task_id}:{attempt}"


@dataclass
class TaskEventBatch:
    """What one write stores: see _WRITE_TASK_EVENTS for each part."""

    complete: list[str] = field(default_factory=list)  # "id\tjson" each
    partial: list[tuple[str, float, int, str, str, str]] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)  # index -> ["score id", ...]
    jobs: set[str] = field(default_factory=set)
    lost: int = 0

    def members(self, index: str) -> list[str]:
        """The list to append "score id" members of `index` to."""
        found = self.groups.get(index)
        if found is None:
            found = self.groups[index] = []
        return found


def write_task_events(gcs: Gcs, batch: TaskEventBatch, max_tasks: int, max_per_job: int) -> int:
    """Store a batch of attempts, keep the indexes, apply the caps (one script call);
    returns how many attempts were new."""
    if not (batch.complete or batch.partial or batch.lost):
        return 0
    packed = "\n".join(batch.complete)
    args: list[Any] = [max_tasks, max_per_job, batch.lost, packed, len(batch.partial)]
    for partial in batch.partial:
        args += partial
    groups = {name: members for name, members in batch.groups.items() if members}
    args.append(len(groups))
    for name, members in groups.items():
        args += (name, " ".join(members))
    args.append(len(batch.jobs))
    args += batch.jobs
    args.append(SWEEP_KEYS_PER_WRITE)
    return int(gcs.eval_script(_WRITE_TASK_EVENTS, [task_prefix(gcs)], args) or 0)


def index_key(gcs: Gcs, column: str, value: str | None = None) -> str:
    """The sorted set of attempts whose `column` is `value` (column "all": no value)."""
    name = column if value is None else f"{column}:{value}"
    return gcs.key(INDEX, name=name)


def index_page(gcs: Gcs, key: str, start: int, count: int) -> list[str]:
    """Entries of an index, newest first, from position start."""
    raw = gcs.redis.zrevrange(key, start, start + count - 1)
    return [r.decode() for r in raw]


def index_sizes(gcs: Gcs, keys: list[str]) -> list[int]:
    replies = gcs.round_trip(*(("ZCARD", key) for key in keys))
    return [int(r or 0) for r in replies]


def read_tasks(gcs: Gcs, entries: list[str]) -> list[dict[str, Any] | None]:
    """The stored record of each attempt (None for attempts no longer stored)."""
    if not entries:
        return []
    raw = gcs.redis.hmget(gcs.key(DATA), entries)
    return [json.loads(blob) if blob else None for blob in raw]


def attempts_of(gcs: Gcs, task_id: str, most: int = 64) -> list[str]:
    """The stored attempts of a task (entries), in attempt order."""
    entries = [entry_id(task_id, n) for n in range(most)]
    raw = gcs.redis.hmget(gcs.key(DATA), entries)
    return [e for e, blob in zip(entries, raw, strict=True) if blob]


def dropped_counts(gcs: Gcs) -> dict[str, int]:
    raw = gcs.redis.hgetall(gcs.key(DROPPED))
    return {k.decode(): int(v) for k, v in raw.items()}


def task_count(gcs: Gcs) -> int:
    return int(gcs.redis.zcard(index_key(gcs, "all")))


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
