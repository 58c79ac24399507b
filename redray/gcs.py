"""The global control store: every Redis key and every Redis command redray uses.

Redis holds what must be shared between nodes or must outlive a process: the node table and
heartbeats, jobs, exported functions, the internal KV, the actor and placement-group tables,
the control loop's lease and request queue, and the pub/sub channels that announce node and
actor state changes. Nothing else in redray talks to Redis, and nothing on the task hot path
comes here.

All keys live under ``redray:{cluster}:`` so several clusters can share one Redis. Tables are
Redis hashes of JSON (readable with ``redis-cli``); function bodies and actor creation specs
are raw bytes. Writes that touch several keys are one Lua script, so a crash never leaves half
of one behind.

Reaching Redis. URLs: ``redis://``, ``rediss://`` (TLS), ``unix://`` and
``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]`` (the password is
the Redis server's; ``?sentinel_password=...`` (and ``sentinel_username``) authenticate to the
sentinels). Every call is bounded: a connection is given up after CONNECT_TIMEOUT_SECONDS, a
reply after the client's socket timeout (SOCKET_TIMEOUT_SECONDS unless given), and a failed
call is retried RETRY_ATTEMPTS times with jittered exponential backoff before its
``redis.ConnectionError``/``redis.TimeoutError`` reaches the caller. Those retries only cover
blips (and a Sentinel failover's reconnection to the new primary); longer outages are the
caller's to ride out, or, for a client made with ``ride_out`` seconds (drivers and workers),
every call waits that long for Redis to answer again before raising redray's
``GcsUnavailableError`` (see redray/gcs_retry.py). A retried write may have been applied once already: control requests
are delivered at least once and their handlers must be idempotent.

What callers do when Redis is lost for a while:

* Any call may raise ``redis.ConnectionError`` or ``redis.TimeoutError``. Keep serving what
  does not need Redis (the task hot path never does), retry with your own backoff, and once
  Redis answers again re-read the tables you mirror: pub/sub messages sent meanwhile are lost
  (pub/sub is a hint, the tables are the truth).
* A node beats with ``heartbeat()``, which answers a HeartbeatStatus. ``UNKNOWN``: Redis lost
  the node's entry (it restarted empty, or without the last writes): call
  ``rejoin_cluster(token, node_id, info, ttl)``, which puts the cluster entry back (same
  token) if ``cluster_exists()`` is False, and registers the node again under the same id.
  ``DEAD``: the control loop declared the node dead and acted on it (its actors were
  restarted elsewhere); the node must not carry on: it exits, or joins again as a new node id.
* Subscriber threads read through ``subscription()``, which raises instead of waiting forever
  on a hung Redis; on an error they make a new one (with backoff) and re-read the tables. A
  (p)subscribe confirmation after the first set means the connection was re-made: re-read too.
* The control loop renews its lease every tick with ``hold_leadership()``, which returns its
  fencing epoch. It writes only with ``Fence(holder, epoch)``; a changed epoch is a new tenure
  (someone else may have led in between): adopt the tables again and handle
  ``unacked_requests()`` first. ``NotLeaderError`` from any fenced write means the tenure
  ended: nothing was written; stop acting as the leader.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

if TYPE_CHECKING:
    import redis

DEFAULT_CLUSTER = "default"

# -- client robustness -------------------------------------------------------------------------
CONNECT_TIMEOUT_SECONDS = 3.0
SOCKET_TIMEOUT_SECONDS = 5.0  # any one reply; blocking commands wait at most half of it
HEALTH_CHECK_SECONDS = 15  # a connection idle this long is PINGed before it is used
RETRY_ATTEMPTS = 2  # retries after the first try, on connection errors and timeouts
RETRY_BACKOFF_BASE_SECONDS = 0.05
RETRY_BACKOFF_CAP_SECONDS = 0.5
PUBSUB_PING_SECONDS = 5.0  # a quiet subscription asks Redis whether it is still there
SENTINEL_DEFAULT_PORT = 26379
URL_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://")

# -- retention (bounded state), overridable by environment variables read by Gcs() -------------
# Ray's maximum_gcs_destroyed_actor_cached_count.
MAX_DEAD_ACTORS = ("REDRAY_MAX_DEAD_ACTORS", 100_000)
# Ray's maximum_gcs_dead_node_cached_count. A dead node's entry is also its tombstone: a late
# heartbeat finds it and the node learns it was declared dead.
MAX_DEAD_NODES = ("REDRAY_MAX_DEAD_NODES", 1_000)
# Ray has no separate knob; groups are created far less often than actors, so a tenth of the
# actors' cap keeps as much history for the state API in a few MB.
MAX_REMOVED_PGS = ("REDRAY_MAX_REMOVED_PGS", 10_000)
# Ray keeps every job; jobs are rare (one per driver), so 10,000 is months of history for a
# busy cluster while bounding what `redray list jobs` reads.
MAX_FINISHED_JOBS = ("REDRAY_MAX_FINISHED_JOBS", 10_000)
# Entries deleted per write when over a cap (Ray's maximum_gcs_deletion_batch_size): a lowered
# cap converges over several writes instead of blocking Redis in one script.
TRIM_BATCH = 1_000
# A function exported for a job that already finished has no user to keep it: it expires.
ORPHAN_FUNCTION_TTL_SECONDS = 600

# -- key templates, relative to the cluster prefix -------------------------------------------
TOKEN = "token"  # the cluster's authentication token; missing: Redis lost this cluster
CONFIG = "config"
NODES = "nodes"  # hash node_id -> JSON info of live nodes (a control tick reads only these)
DEAD_NODES = "dead_nodes"  # hash node_id -> JSON info of nodes declared dead (newest kept)
DEAD_NODE_INDEX = "dead_nodes_by_time"  # sorted set node_id -> time declared dead
HEARTBEAT = "hb:{node_id}"  # JSON available resources, expires when the node stops beating
# JSON of the machine's CPU and memory use, beside the beat: it changes every beat, so it is
# kept out of the cluster view's change log (idle nodes must cost the other nodes nothing).
HEARTBEAT_HOST = "hb_host:{node_id}"
NODE_VIEW_SEQ = "node_view_seq"  # counter: one tick per change of a live node's entry or beat
NODE_VIEW_CHANGES = "node_view_changes"  # sorted set live node_id -> seq of its last change
NODE_VIEW_EPOCH = "node_view_epoch"  # random, new when a node leaves or Redis lost the view
JOB_COUNTER = "job_counter"
JOBS = "jobs"  # hash job_id -> JSON job info (running, and the newest finished)
FINISHED_JOBS = "finished_jobs"  # sorted set job_id -> end time
FUNCTION = "fn:{key}"  # cloudpickled function or class, exported once by content hash
FUNCTION_USERS = "fn_users:{key}"  # set of users ("job:<id>", "actor:<id>") of a function
FUNCTION_USES = "fn_uses:{user}"  # set of function keys one user needs
KV = "kv:{namespace}"  # hash key -> value (Ray's internal KV)
ACTORS = "actors"  # hash actor_id -> JSON actor info
ACTOR_SPECS = "actor_specs"  # hash actor_id -> pickled creation spec, while not DEAD
DEAD_ACTORS = "dead_actors"  # sorted set actor_id -> time of death
NAMED_ACTORS = "named_actors"  # hash "namespace\0name" -> actor_id
PLACEMENT_GROUPS = "pgs"  # hash pg_id -> JSON placement group info
REMOVED_PGS = "removed_pgs"  # sorted set pg_id -> time removed
NAMED_PGS = "named_pgs"  # hash "namespace\0name" -> pg_id
LEADER = "leader"  # the GCS control loop's lease: holder id, with a TTL
LEADER_EPOCH = "leader_epoch"  # fencing epoch, incremented whenever a free lease is taken
REQUESTS = "requests"  # list of JSON requests to the control loop, oldest first
REQUESTS_TAKEN = "requests_taken"  # requests the leader took and has not acknowledged yet

# Pub/sub channels, relative to the cluster prefix.
NODE_CHANNEL = "ch:nodes"
ACTOR_CHANNEL = "ch:actors"
PG_STATE_CHANNEL = "ch:pg:{pg_id}"  # one placement group's state changes
JOB_CHANNEL = "ch:jobs"
WORKER_CHANNEL = "ch:workers"  # a driver or worker process died
ACTOR_STATE_CHANNEL = "ch:actor:{actor_id}"  # one actor's state changes

# -- control requests: kind -> fields and their JSON types -------------------------------------
REQUEST_SCHEMA: dict[str, dict[str, type]] = {
    "create_actor": {"actor_id": str},
    "kill_actor": {"actor_id": str, "no_restart": bool},
    "actor_out_of_scope": {"actor_id": str},
    "create_pg": {"pg_id": str, "info": dict},
    "remove_pg": {"pg_id": str},
}
_JSON_TYPE_NAMES = {str: "string", bool: "boolean", dict: "object"}

# Terminal states that move an entry into its retention index.
ACTOR_DEAD = "DEAD"
PG_REMOVED = "REMOVED"


class NotLeaderError(Exception):
    """A fenced write was refused: the lease is not held by the fence's holder under the
    fence's epoch (it expired, another head took it, or it was taken again since). Nothing
    was written."""

    def __init__(self, fence: Fence | None = None):
        super().__init__(
            f"{fence.holder!r} does not hold the control loop's lease at epoch {fence.epoch}: "
            "the write was refused"
            if fence is not None
            else "this head does not lead the control loop: the write was refused"
        )
        self.fence = fence


class NodeDeadError(Exception):
    """The node was declared dead: it cannot register again under the same id."""


@dataclass(frozen=True)
class LiveNodes:
    """The live nodes as one reader last saw them (``Gcs.node_changes``): ``seq`` and
    ``epoch`` say how far the reader got; ``changed`` is how many entries the last read
    carried."""

    seq: int
    epoch: str
    nodes: dict[str, dict[str, Any]]
    changed: int = 0


class HeartbeatStatus(str, enum.Enum):
    """What a heartbeat learned about its node."""

    OK = "ok"  # the node is in the live table; its liveness was renewed
    DEAD = "dead"  # the node was declared dead: it must exit (or join as a new node)
    UNKNOWN = "unknown"  # Redis has no entry for it (lost its data): register again


@dataclass(frozen=True)
class Fence:
    """The leader's identity for fenced writes: the lease holder and the epoch
    ``hold_leadership`` returned."""

    holder: str
    epoch: int

    def __post_init__(self) -> None:
        if not isinstance(self.holder, str) or not self.holder:
            raise ValueError(f"a fence needs a holder id, got {self.holder!r}")
        if isinstance(self.epoch, bool) or not isinstance(self.epoch, int) or self.epoch < 1:
            raise ValueError(
                f"a fence needs the epoch hold_leadership returned, got {self.epoch!r}"
            )


@dataclass(frozen=True)
class Request:
    """A control request, decoded and checked against REQUEST_SCHEMA."""

    kind: str
    fields: dict[str, Any]
    raw: bytes  # the entry as queued: what ack_requests removes

    @property
    def args(self) -> tuple:
        """The field values in schema order (the handler's positional arguments)."""
        return tuple(self.fields[name] for name in REQUEST_SCHEMA[self.kind])


@dataclass(frozen=True)
class BadRequest:
    """A queued entry that is not a valid control request: log it and acknowledge it."""

    raw: bytes
    error: str


# -- Lua -------------------------------------------------------------------------------------
# Every fenced script starts with this check. KEYS[1] the lease, KEYS[2] the epoch counter,
# ARGV[1] the holder ('' for the unfenced calls kept for older callers), ARGV[2] the epoch.
_LUA_FENCE = """
if ARGV[1] ~= '' and (redis.call('GET', KEYS[1]) ~= ARGV[1]
    or redis.call('GET', KEYS[2]) ~= ARGV[2]) then
  return redis.error_reply('NOTLEADER')
end
"""

LUA_FENCE = _LUA_FENCE  # for the fenced scripts of capability subpackages (their keys.py)

# Delete the oldest entries of a retention index beyond cap (at most batch per call): the
# table entries, their entries in other hashes, and name bindings still pointing at them.
_LUA_TRIM = """
local function trim(index, table_key, names, other, cap, batch)
  local excess = redis.call('ZCARD', index) - tonumber(cap)
  if excess <= 0 then return 0 end
  if excess > tonumber(batch) then excess = tonumber(batch) end
  local ids = redis.call('ZRANGE', index, 0, excess - 1)
  for _, id in ipairs(ids) do
    if names then
      local raw = redis.call('HGET', table_key, id)
      if raw then
        local ok, info = pcall(cjson.decode, raw)
        if ok and type(info) == 'table' and type(info.name) == 'string' and info.name ~= '' then
          local ns = info.namespace
          if type(ns) ~= 'string' then ns = '' end
          local field = ns .. '\\0' .. info.name
          if redis.call('HGET', names, field) == id then redis.call('HDEL', names, field) end
        end
      end
    end
    redis.call('HDEL', table_key, id)
    if other then redis.call('HDEL', other, id) end
  end
  redis.call('ZREMRANGEBYRANK', index, 0, #ids - 1)
  return #ids
end
"""

# A user (a job, an actor) no longer needs its functions: a function's blob goes with its
# last user.
_LUA_RELEASE_USER = """
local function release_user(fn_prefix, users_prefix, uses_key, user)
  for _, key in ipairs(redis.call('SMEMBERS', uses_key)) do
    local users = users_prefix .. key
    redis.call('SREM', users, user)
    if redis.call('SCARD', users) == 0 then redis.call('DEL', fn_prefix .. key) end
  end
  redis.call('DEL', uses_key)
end
"""

# Renew the lease if we hold it (same epoch); take it if free (next epoch). Returns the epoch,
# 0 when someone else holds it. The counter, if Redis lost it, restarts from the time in
# microseconds (ARGV[3]) so an epoch is never handed out twice. KEYS: lease, epoch. ARGV:
# holder, ttl (ms), epoch seed (µs). Public: other fenced leases (the durable queues' beat
# scheduler) take theirs the same way.
LUA_LEASE_HOLD = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  local epoch = redis.call('GET', KEYS[2])
  if epoch then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(epoch)
  end
elseif holder then
  return 0
end
if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('SET', KEYS[2], ARGV[3]) end
local epoch = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return epoch
"""

# Give a lease up if ARGV[1] still holds it. KEYS: lease.
LUA_LEASE_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Write a named entry only when the name is free (or already ours); returns the owner.
_CLAIM_NAME_SCRIPT = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current == false then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return ARGV[2]
end
return current
"""

_RELEASE_NAME_SCRIPT = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""

# KEYS: nodes, dead nodes, heartbeat, view seq, view changes, view epoch. ARGV: node_id,
# info, beat, ttl ms, channel, message, a new view epoch (used if there is none).
_REGISTER_NODE_SCRIPT = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
redis.call('SET', KEYS[6], ARGV[7], 'NX')
redis.call('ZADD', KEYS[5], redis.call('INCR', KEYS[4]), ARGV[1])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
"""

# KEYS: nodes, dead nodes, heartbeat, view seq, view changes. ARGV: node_id, beat, ttl ms.
# A beat that reports what the last one did only renews the key: readers of the node view
# see it change only when it does.
_HEARTBEAT_SCRIPT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  if redis.call('GET', KEYS[3]) == ARGV[2] then
    redis.call('PEXPIRE', KEYS[3], ARGV[3])
  else
    redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
    redis.call('ZADD', KEYS[5], redis.call('INCR', KEYS[4]), ARGV[1])
  end
  if ARGV[4] ~= '' then redis.call('SET', KEYS[6], ARGV[4], 'PX', ARGV[3]) end
  return 'ok'
end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 'dead' end
return 'unknown'
"""

# Every live node with its heartbeat (nil once expired): node_id, info, beat, ...
_LIVE_NODES_SCRIPT = """
local flat = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #flat, 2 do
  out[#out + 1] = flat[i]
  out[#out + 1] = flat[i + 1]
  out[#out + 1] = redis.call('GET', ARGV[1] .. flat[i])
end
return out
"""

# KEYS: nodes, view seq, view epoch, view changes. ARGV: heartbeat key prefix, the seq and
# epoch the reader has. Answers seq, epoch, 1 if every live node follows (else only those
# changed since the reader's seq), then node_id, info, beat (nil once expired) for each.
_NODE_CHANGES_SCRIPT = """
local seq = tonumber(redis.call('GET', KEYS[2]) or '0')
local epoch = redis.call('GET', KEYS[3]) or '0'
local since = tonumber(ARGV[2])
local out = {seq, epoch, 0}
if epoch ~= ARGV[3] or since > seq then
  out[3] = 1
  local flat = redis.call('HGETALL', KEYS[1])
  for i = 1, #flat, 2 do
    out[#out + 1] = flat[i]
    out[#out + 1] = flat[i + 1]
    out[#out + 1] = redis.call('GET', ARGV[1] .. flat[i])
  end
  return out
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '(' .. since, '+inf')) do
  local info = redis.call('HGET', KEYS[1], id)
  if info then
    out[#out + 1] = id
    out[#out + 1] = info
    out[#out + 1] = redis.call('GET', ARGV[1] .. id)
  end
end
return out
"""

# KEYS: lease, epoch, nodes, dead nodes, dead index, heartbeat, view epoch, view changes.
# ARGV: holder, epoch, node_id,
# the live entry read (unchanged since, or nothing is done), dead info, channel, message, now,
# cap, batch, a new view epoch.
_MARK_NODE_DEAD_SCRIPT = (
    _LUA_TRIM
    + _LUA_FENCE
    + """
if redis.call('HGET', KEYS[3], ARGV[3]) ~= ARGV[4] then return 0 end
redis.call('HDEL', KEYS[3], ARGV[3])
redis.call('HSET', KEYS[4], ARGV[3], ARGV[5])
redis.call('DEL', KEYS[6])
redis.call('ZREM', KEYS[8], ARGV[3])
redis.call('SET', KEYS[7], ARGV[11])
redis.call('ZADD', KEYS[5], ARGV[8], ARGV[3])
redis.call('PUBLISH', ARGV[6], ARGV[7])
trim(KEYS[5], KEYS[4], false, false, ARGV[9], ARGV[10])
return 1
"""
)

# KEYS: jobs, finished index. ARGV: job_id, info, channel, message, now, cap, batch,
# fn prefix, users prefix, the job's uses key, the job as a user.
_FINISH_JOB_SCRIPT = (
    _LUA_TRIM
    + _LUA_RELEASE_USER
    + """
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[4])
release_user(ARGV[8], ARGV[9], ARGV[10], ARGV[11])
trim(KEYS[2], KEYS[1], false, false, ARGV[6], ARGV[7])
return 1
"""
)

# KEYS: fn, its users, the user's uses, finished jobs. ARGV: blob, user, job_id, orphan ttl,
# function key.
_EXPORT_FUNCTION_SCRIPT = """
if redis.call('ZSCORE', KEYS[4], ARGV[3]) then
  redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[4])
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'NX')
redis.call('PERSIST', KEYS[1])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[5])
return 1
"""

# KEYS: actors, specs, requests, the actor's uses. ARGV: actor_id, info, spec, request,
# users prefix, the actor as a user, then the function keys it needs.
_CREATE_ACTOR_SCRIPT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('RPUSH', KEYS[3], ARGV[4])
for i = 7, #ARGV do
  redis.call('SADD', ARGV[5] .. ARGV[i], ARGV[6])
  redis.call('SADD', KEYS[4], ARGV[i])
end
return 1
"""

# KEYS: lease, epoch, actors, specs, dead index, named actors, the actor's uses.
# ARGV: holder, epoch, actor_id, info, channel, dead ('1'/''), now, cap, batch, fn prefix,
# users prefix, the actor as a user.
_UPDATE_ACTOR_SCRIPT = (
    _LUA_TRIM
    + _LUA_RELEASE_USER
    + _LUA_FENCE
    + """
redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[4])
if ARGV[6] == '1' then
  redis.call('HDEL', KEYS[4], ARGV[3])
  redis.call('ZADD', KEYS[5], 'NX', ARGV[7], ARGV[3])
  release_user(ARGV[10], ARGV[11], KEYS[7], ARGV[12])
  trim(KEYS[5], KEYS[3], KEYS[6], KEYS[4], ARGV[8], ARGV[9])
end
return 1
"""
)

# Write a table entry and queue a request for the control loop, atomically.
_PUT_AND_REQUEST_SCRIPT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[3])
return 1
"""

# KEYS: lease, epoch, pgs, removed index, named pgs. ARGV: holder, epoch, channel prefix, now,
# cap, batch, then (pg_id, info, removed '1'/'') for each update, in order.
_UPDATE_PGS_SCRIPT = (
    _LUA_TRIM
    + _LUA_FENCE
    + """
local removed = false
for i = 7, #ARGV, 3 do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  redis.call('PUBLISH', ARGV[3] .. ARGV[i], ARGV[i + 1])
  if ARGV[i + 2] == '1' then
    redis.call('ZADD', KEYS[4], 'NX', ARGV[4], ARGV[i])
    removed = true
  end
end
if removed then trim(KEYS[4], KEYS[3], KEYS[5], false, ARGV[5], ARGV[6]) end
return 1
"""
)

# KEYS: lease, epoch, requests, taken. ARGV: holder, epoch, limit. Moves up to limit requests
# to the taken list and returns them.
_TAKE_REQUESTS_SCRIPT = (
    _LUA_FENCE
    + """
local items = {}
for i = 1, tonumber(ARGV[3]) do
  local item = redis.call('LMOVE', KEYS[3], KEYS[4], 'LEFT', 'RIGHT')
  if not item then break end
  items[#items + 1] = item
end
return items
"""
)

# KEYS: lease, epoch, taken. ARGV: holder, epoch, then the entries to remove (one each).
_ACK_REQUESTS_SCRIPT = (
    _LUA_FENCE
    + """
local removed = 0
for i = 3, #ARGV do removed = removed + redis.call('LREM', KEYS[3], 1, ARGV[i]) end
return removed
"""
)


def _live_node_entries(flat: list[Any]) -> list[dict[str, Any]]:
    """Nodes from a script's flat node_id, info, beat triples (``alive`` from the beat)."""
    result = []
    for i in range(0, len(flat), 3):
        node_id = flat[i].decode()
        info = _loads(flat[i + 1])
        beat = _loads(flat[i + 2])
        info["node_id"] = node_id
        info["alive"] = beat is not None
        if beat is not None:
            info["available"] = beat.get("available", beat)
            info["load"] = beat.get("load", {})
            if "total" in beat:
                info["resources"] = beat["total"]
        result.append(info)
    return result


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _loads(raw: bytes | str | None) -> Any:
    return None if raw is None else json.loads(raw)


def _name_field(namespace: str, name: str) -> str:
    return f"{namespace}\0{name}"


def _env_cap(setting: tuple[str, int]) -> int:
    name, default = setting
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return value


def check_request(kind: str, fields: dict[str, Any]) -> None:
    """Raise ValueError (unknown kind, empty id) or TypeError (missing, unexpected or
    mistyped field) unless ``fields`` is a valid request of ``kind``."""
    schema = REQUEST_SCHEMA.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise ValueError(
            f"unknown control request {kind!r}; known kinds: {', '.join(REQUEST_SCHEMA)}"
        )
    missing = [name for name in schema if name not in fields]
    extra = [name for name in fields if name not in schema]
    if missing or extra:
        raise TypeError(
            f"control request {kind!r} takes fields {list(schema)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unexpected {extra}" if extra else "")
        )
    for name, expected in schema.items():
        value = fields[name]
        if not isinstance(value, expected):
            raise TypeError(
                f"control request {kind!r}: {name} must be a JSON {_JSON_TYPE_NAMES[expected]},"
                f" got {type(value).__name__}"
            )
        if expected is str and not value:
            raise ValueError(f"control request {kind!r}: {name} is empty")


def encode_request(kind: str, fields: dict[str, Any]) -> bytes:
    """The queued form of a checked request (raises as check_request, or TypeError for a
    value JSON cannot hold)."""
    check_request(kind, fields)
    return _dumps({"kind": kind, "fields": fields}).encode()


def decode_request(raw: bytes) -> Request | BadRequest:
    """A queued entry as a Request, or a BadRequest saying what is wrong with it (never
    raises: one bad entry must not cost the burst it came in)."""
    try:
        entry = json.loads(raw)
        if not isinstance(entry, dict) or set(entry) != {"kind", "fields"}:
            raise ValueError('not an object with "kind" and "fields"')
        if not isinstance(entry["fields"], dict):
            raise TypeError('"fields" is not an object')
        check_request(entry["kind"], entry["fields"])
    except (ValueError, TypeError, RecursionError) as exc:
        return BadRequest(raw, f"{type(exc).__name__}: {exc}")
    return Request(entry["kind"], entry["fields"], raw)


@dataclass(frozen=True)
class SentinelAddress:
    """What a ``redis+sentinel://`` URL names."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None  # the Redis servers'
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    @classmethod
    def parse(cls, url: str) -> SentinelAddress:
        """Raises ValueError for a URL without sentinels or service, or a bad port or db."""
        rest = url[len("redis+sentinel://") :]
        rest, _, query = rest.partition("?")
        netloc, _, path = rest.partition("/")
        userinfo, at, hosts = netloc.rpartition("@")
        if not at:
            userinfo, hosts = "", netloc
        username, _, password = userinfo.partition(":")
        sentinels = []
        for host_port in hosts.split(","):
            if host_port.startswith("["):  # [ipv6]:port
                host, _, port = host_port[1:].partition("]")
                port = port.lstrip(":")
            else:
                host, _, port = host_port.partition(":")
            if not host:
                raise ValueError(f"no sentinel host in {url!r}")
            try:
                sentinels.append((host, int(port) if port else SENTINEL_DEFAULT_PORT))
            except ValueError:
                raise ValueError(f"bad sentinel port {port!r} in {url!r}") from None
        parts = [unquote(p) for p in path.split("/") if p]
        if not parts or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise ValueError(
                "a Sentinel URL names its service: "
                f"redis+sentinel://host:port[,host:port...]/service[/db], got {url!r}"
            )
        options = {k: v[-1] for k, v in parse_qs(query).items()}
        return cls(
            sentinels,
            parts[0],
            int(parts[1]) if len(parts) == 2 else 0,
            unquote(username) or None,
            unquote(password) or None,
            options.get("sentinel_username") or None,
            options.get("sentinel_password") or None,
        )

    def client(
        self, socket_timeout: float, common: dict[str, Any], sentinel_retry: Any
    ) -> tuple[Any, Any]:
        """A client of the service's primary, following its failovers, and the Sentinel
        object it asks. The sentinels are asked with sentinel_retry (short: when one does not
        answer, the next one is asked)."""
        import redis
        from redis.sentinel import Sentinel

        sentinel_kwargs = {
            "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
            "socket_timeout": socket_timeout,
            "retry": sentinel_retry,
            "username": self.sentinel_username,
            "password": self.sentinel_password,
        }
        sentinel = Sentinel(
            self.sentinels,
            sentinel_kwargs=sentinel_kwargs,
            username=self.username,
            password=self.password,
            db=self.db,
            **common,
        )
        return sentinel.master_for(self.service, redis_class=redis.Redis), sentinel


class Subscription:
    """A pub/sub subscription read by one thread, which never waits forever on a hung Redis.

    Messages come as redis-py gives them (dicts with type, channel or pattern, data). When
    the subscription has heard nothing for ``ping_seconds`` it pings Redis; if no answer comes
    within ``silence_seconds`` the server is taken as hung."""

    def __init__(
        self,
        pubsub: redis.client.PubSub,
        ping_seconds: float,
        silence_seconds: float,
    ):
        self._pubsub = pubsub
        self._ping_seconds = ping_seconds
        self._silence_seconds = silence_seconds
        self._last_heard = time.monotonic()
        self._ping_sent: float | None = None
        self._token = os.urandom(8).hex()

    def get_message(self, timeout: float) -> dict[str, Any] | None:
        """The next message, or None if none came within timeout seconds (0: only what has
        arrived already).

        Raises redis.TimeoutError when Redis left a ping unanswered for silence_seconds, and
        redis.ConnectionError when the connection is lost beyond the client's retries; the
        subscription is closed then: make a new one and re-read what you mirror."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                wait = min(deadline, self._next_check()) - time.monotonic()
                message = self._pubsub.get_message(timeout=max(0.0, wait))
                if message is not None:
                    self._last_heard = time.monotonic()
                    if message["type"] != "pong":
                        return message
                    data = message["data"]
                    if (data.decode() if isinstance(data, bytes) else data) == self._token:
                        self._ping_sent = None
                if time.monotonic() >= deadline:
                    return None
        except BaseException:
            self.close()
            raise

    def _next_check(self) -> float:
        """Ping Redis if it has been quiet, fail if a ping went unanswered; when to look
        again."""
        import redis

        now = time.monotonic()
        if self._ping_sent is None:
            if now - self._last_heard < self._ping_seconds:
                return self._last_heard + self._ping_seconds
            self._pubsub.ping(self._token)
            self._ping_sent = now
        answer_due = self._ping_sent + self._silence_seconds
        if now >= answer_due:
            raise redis.TimeoutError(
                f"Redis left a pub/sub ping unanswered for {self._silence_seconds} s"
            )
        return answer_due

    def close(self) -> None:
        try:
            self._pubsub.close()
        except Exception:
            pass


class Gcs:
    """A client of one cluster's tables in Redis (thread-safe: calls share a connection
    pool)."""

    def __init__(
        self,
        url: str | None = None,
        cluster: str = DEFAULT_CLUSTER,
        client: redis.Redis | None = None,
        socket_timeout: float = SOCKET_TIMEOUT_SECONDS,
        ride_out: float = 0.0,
    ):
        """Raises ValueError without a URL or client, for a URL scheme other than
        URL_SCHEMES, or for a bad REDRAY_MAX_* setting (connecting waits for the first call).

        ride_out > 0: a call that finds Redis unreachable waits for it to answer again, up to
        that many seconds (the attribute may be lowered later, e.g. to 0 when leaving), then
        raises redray's GcsUnavailableError; subscriptions still fail fast. 0: after the
        short retries the redis error reaches the caller."""
        if client is None and url is None:
            raise ValueError("Gcs needs a Redis URL or a client")
        if client is None and not url.startswith(URL_SCHEMES):
            raise ValueError(f"unsupported Redis URL {url!r}: use one of {', '.join(URL_SCHEMES)}")
        self._sentinel_address = (
            SentinelAddress.parse(url)
            if client is None and url.startswith("redis+sentinel://")
            else None
        )
        self.url = url
        self.cluster = cluster
        self.prefix = f"redray:{cluster}:"
        self.socket_timeout = socket_timeout
        self.max_dead_actors = _env_cap(MAX_DEAD_ACTORS)
        self.max_dead_nodes = _env_cap(MAX_DEAD_NODES)
        self.max_removed_pgs = _env_cap(MAX_REMOVED_PGS)
        self.max_finished_jobs = _env_cap(MAX_FINISHED_JOBS)
        self.ride_out = ride_out
        self._client = client
        self._subscriber: redis.Redis | None = client  # short retries only (see subscription)
        self._sentinels: list[Any] = []
        self._client_lock = threading.Lock()
        self._shas: dict[str, str] = {}

    @property
    def redis(self) -> redis.Redis:
        """The Redis client, made (and the redis package imported) on first use: a worker
        that only runs tasks never needs it, and the package costs ~16 MB per process."""
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = self._connect()
        return self._client

    @property
    def subscriber(self) -> redis.Redis:
        """The client subscriptions use: with short retries even when calls ride outages out,
        so a subscriber thread learns at once that its subscription is gone."""
        if self._subscriber is None:
            if not self.ride_out:
                self._subscriber = self.redis
            else:
                with self._client_lock:
                    if self._subscriber is None:
                        self._subscriber = self._connect(ride_out=False)
        return self._subscriber

    def _connect(self, ride_out: bool | None = None) -> redis.Redis:
        import redis

        from redray.gcs_retry import RideOutRetry, short_retry

        if ride_out is None:
            ride_out = self.ride_out > 0
        short = short_retry(RETRY_ATTEMPTS, RETRY_BACKOFF_BASE_SECONDS, RETRY_BACKOFF_CAP_SECONDS)
        if ride_out:
            retry = RideOutRetry(lambda: self.ride_out, RETRY_ATTEMPTS, RETRY_BACKOFF_BASE_SECONDS)
        else:
            retry = short
        common = {
            "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
            "socket_timeout": self.socket_timeout,
            "health_check_interval": HEALTH_CHECK_SECONDS,
            "retry": retry,
        }
        if self._sentinel_address is not None:
            client, sentinel = self._sentinel_address.client(self.socket_timeout, common, short)
            self._sentinels.append(sentinel)
            return client
        return redis.Redis.from_url(self.url, **common)

    @property
    def blocking_max(self) -> float:
        """The longest a blocking command waits server-side: half the socket timeout, so a
        reply is always due before the client gives up on the connection."""
        return self.socket_timeout / 2

    def _round_trip(self, *commands: tuple) -> list[Any]:
        """Send commands in one write and read their raw replies, on a pooled connection,
        retried like any call on a lost connection or a timeout.

        What a redis-py pipeline does, without its per-call bookkeeping (about half its
        client CPU): for the paths run once per request under load. An error reply is
        raised once every reply is read, so the connection stays usable."""
        pool = self.redis.connection_pool
        conn = pool.get_connection()
        try:
            return conn.retry.call_with_retry(
                lambda: self._send_and_read(conn, commands), lambda error: conn.disconnect()
            )
        finally:
            pool.release(conn)

    @staticmethod
    def _send_and_read(conn: Any, commands: tuple) -> list[Any]:
        from redis.exceptions import ResponseError

        replies: list[Any] = []
        error: Exception | None = None
        try:
            conn.send_packed_command(conn.pack_commands(commands))
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except ResponseError as exc:
                    error = error or exc
                    replies.append(None)
        except BaseException:
            conn.disconnect()  # replies may be left unread: never reuse it as it is
            raise
        if error is not None:
            try:
                raise error
            finally:
                # The error's traceback holds this frame: a local still pointing at the
                # error would make a cycle keeping every caller's frame (and what their
                # locals hold, user objects included) alive until the cyclic GC ran.
                del error
        return replies

    def _script_commands(self, source: str, keys: list[str], args: list[Any]) -> tuple:
        sha = self._shas.get(source)
        if sha is None:
            sha = self._shas[source] = hashlib.sha1(source.encode()).hexdigest()
        return ("EVALSHA", sha, len(keys), *keys, *args)

    def _eval(
        self,
        source: str,
        keys: list[str],
        args: list[Any],
        fence: Fence | None = None,
        before: tuple = (),
    ) -> Any:
        """Run a script (cached by SHA), after the commands in ``before`` on the same
        connection; its reply (with ``before``: every reply). A fence refusal is raised as
        NotLeaderError."""
        from redis.exceptions import NoScriptError, ResponseError

        try:
            try:
                replies = self._round_trip(*before, self._script_commands(source, keys, args))
            except NoScriptError:  # not cached on this server yet; what came before is done
                replies = [None] * len(before)
                replies += self._round_trip(("EVAL", source, len(keys), *keys, *args))
        except ResponseError as exc:
            if fence is not None and str(exc).startswith("NOTLEADER"):
                raise NotLeaderError(fence) from None
            raise
        return replies if before else replies[0]

    def run_script(self, source: str, keys: list[str], args: list[Any]) -> Any:
        """Run one of a subpackage's Lua scripts (cached by SHA) and return its reply: the
        hook through which capabilities with their own key modules (redray/durable/keys.py)
        reach Redis with this client's timeouts and retries."""
        return self._eval(source, keys, list(args))

    def run_scripts(self, calls: list[tuple[str, list[str], list[Any]]]) -> list[Any]:
        """Run several (source, keys, args) scripts in one round trip, in order; their
        replies. A script not cached on the server yet is loaded and the batch sent again,
        so the scripts must be safe to run twice (idempotent)."""
        from redis.exceptions import NoScriptError

        if not calls:
            return []
        commands = [self._script_commands(source, keys, list(args)) for source, keys, args in calls]
        try:
            return self._round_trip(*commands)
        except NoScriptError:
            for source in {source for source, _, _ in calls}:
                self.redis.script_load(source)
            return self._round_trip(*commands)

    def round_trip(self, *commands: tuple) -> list[Any]:
        """Send commands in one write and read their raw replies (see _round_trip)."""
        return self._round_trip(*commands)

    def _fence_keys(self) -> list[str]:
        return [self.key(LEADER), self.key(LEADER_EPOCH)]

    @staticmethod
    def _fence_args(fence: Fence | None) -> list[Any]:
        if fence is None:
            return ["", ""]
        if not isinstance(fence, Fence):
            raise TypeError(f"expected a Fence, got {type(fence).__name__}")
        return [fence.holder, str(fence.epoch)]

    def _key_prefix(self, template: str) -> str:
        """The key of ``template`` up to its one trailing field, for scripts to complete."""
        head, brace, _ = template.partition("{")
        assert brace and template.endswith("}"), template
        return self.prefix + head

    def key(self, template: str, **fields: str) -> str:
        return self.prefix + template.format(**fields)

    def channel(self, name: str) -> str:
        return self.prefix + name

    def ping(self) -> bool:
        return bool(self.redis.ping())

    def close(self) -> None:
        for client in {id(c): c for c in (self._client, self._subscriber) if c}.values():
            client.close()
        for sentinel in self._sentinels:
            for server in sentinel.sentinels:
                server.close()

    # -- cluster ----------------------------------------------------------------------------
    def init_cluster(self, token: bytes, config: dict[str, Any] | None = None) -> bytes:
        """Store the cluster token unless one exists; return the token in force."""
        pipe = self.redis.pipeline()
        pipe.set(self.key(TOKEN), token, nx=True)
        pipe.get(self.key(TOKEN))
        if config is not None:
            pipe.set(self.key(CONFIG), _dumps(config), nx=True)
        return pipe.execute()[1]

    def cluster_token(self) -> bytes | None:
        return self.redis.get(self.key(TOKEN))

    def cluster_exists(self) -> bool:
        """False when Redis holds no entry for this cluster: it restarted empty (or lost its
        data). Nodes then put it back with rejoin_cluster."""
        return bool(self.redis.exists(self.key(TOKEN)))

    def cluster_config(self) -> dict[str, Any]:
        return _loads(self.redis.get(self.key(CONFIG))) or {}

    def rejoin_cluster(
        self,
        token: bytes,
        node_id: str,
        info: dict[str, Any],
        ttl: float,
        config: dict[str, Any] | None = None,
    ) -> None:
        """After a heartbeat answered UNKNOWN: re-create the cluster entry if Redis lost it
        (with the token the node already has) and register the node again.

        Raises ValueError if the Redis now holds another cluster's token under this name,
        NodeDeadError if the node was declared dead meanwhile."""
        in_force = self.init_cluster(token, config)
        if in_force != token:
            raise ValueError(
                f"cluster {self.cluster!r} in this Redis has another token: not rejoining"
            )
        self.register_node(node_id, info, ttl)

    # -- nodes ------------------------------------------------------------------------------
    def register_node(self, node_id: str, info: dict[str, Any], ttl: float) -> None:
        """Add a node as alive and start its heartbeat. Idempotent: registering again (after
        Redis lost its entry) overwrites the entry; pass ``start_time`` in info to keep it.

        Raises NodeDeadError if the node was declared dead: it joins again under a new id."""
        info = {**info, "state": "ALIVE"}
        info.setdefault("start_time", time.time())
        registered = self._eval(
            _REGISTER_NODE_SCRIPT,
            [
                self.key(NODES),
                self.key(DEAD_NODES),
                self.key(HEARTBEAT, node_id=node_id),
                self.key(NODE_VIEW_SEQ),
                self.key(NODE_VIEW_CHANGES),
                self.key(NODE_VIEW_EPOCH),
            ],
            [
                node_id,
                _dumps(info),
                _dumps({"available": info.get("available", {}), "load": {}}),
                max(1, int(ttl * 1000)),
                self.channel(NODE_CHANNEL),
                _dumps({"node_id": node_id, "state": "ALIVE"}),
                os.urandom(8).hex(),
            ],
        )
        if not registered:
            raise NodeDeadError(f"node {node_id} was declared dead; it cannot register again")

    def heartbeat(
        self,
        node_id: str,
        available: dict[str, float],
        ttl: float,
        load: dict[str, Any] | None = None,
        total: dict[str, float] | None = None,
        host: dict[str, float] | None = None,
    ) -> HeartbeatStatus:
        """Renew a node's liveness with its free (and, as they change, total) resources.

        Returns OK, or (renewing nothing) DEAD when the node was declared dead, UNKNOWN when
        Redis has no entry for it (see the module docstring for what the node does then)."""
        payload = {"available": available, "load": load or {}}
        if total is not None:
            payload["total"] = total
        status = self._eval(
            _HEARTBEAT_SCRIPT,
            [
                self.key(NODES),
                self.key(DEAD_NODES),
                self.key(HEARTBEAT, node_id=node_id),
                self.key(NODE_VIEW_SEQ),
                self.key(NODE_VIEW_CHANGES),
                self.key(HEARTBEAT_HOST, node_id=node_id),
            ],
            [node_id, _dumps(payload), max(1, int(ttl * 1000)), _dumps(host) if host else ""],
        )
        return HeartbeatStatus(status.decode() if isinstance(status, bytes) else status)

    def live_nodes(self) -> list[dict[str, Any]]:
        """The nodes not declared dead, with ``alive`` False once a heartbeat expired (the
        control loop's failure detection reads only these), one round trip."""
        flat = self._eval(_LIVE_NODES_SCRIPT, [self.key(NODES)], [self.key(HEARTBEAT, node_id="")])
        return _live_node_entries(flat)

    def node_changes(self, since: LiveNodes | None) -> LiveNodes:
        """The live nodes as ``since`` saw them, brought up to date in one round trip that
        carries only the nodes whose entry or beat changed since (all of them when a node
        left, Redis lost the view, or ``since`` is None).

        Every node reads this each beat: reading every node each time made the cluster's
        Redis work grow with the square of its nodes; idle nodes now cost nothing to read."""
        seq, epoch = (since.seq, since.epoch) if since is not None else (-1, "")
        flat = self._eval(
            _NODE_CHANGES_SCRIPT,
            [
                self.key(NODES),
                self.key(NODE_VIEW_SEQ),
                self.key(NODE_VIEW_EPOCH),
                self.key(NODE_VIEW_CHANGES),
            ],
            [self.key(HEARTBEAT, node_id=""), seq, epoch],
        )
        new_epoch = flat[1].decode() if isinstance(flat[1], bytes) else str(flat[1])
        changed = _live_node_entries(flat[3:])
        if flat[2] or since is None:
            nodes = {}
        else:
            nodes = dict(since.nodes)
        nodes.update((n["node_id"], n) for n in changed)
        return LiveNodes(int(flat[0]), new_epoch, nodes, len(changed))

    def dead_nodes(self) -> list[dict[str, Any]]:
        """The nodes declared dead (the newest max_dead_nodes of them)."""
        result = []
        for node_id, raw in self.redis.hgetall(self.key(DEAD_NODES)).items():
            info = _loads(raw)
            info.update(node_id=node_id.decode(), alive=False, available={})
            result.append(info)
        return result

    def nodes(self) -> list[dict[str, Any]]:
        """Every node: live ones (``alive`` from the heartbeat, their machine's CPU and memory
        use in ``load``) then the dead ones kept."""
        live = self.live_nodes()
        if live:
            hosts = self.redis.mget(
                [self.key(HEARTBEAT_HOST, node_id=info["node_id"]) for info in live]
            )
            for info, raw in zip(live, hosts, strict=True):
                if raw is not None and info["alive"]:
                    info.setdefault("load", {}).update(_loads(raw))
        return live + self.dead_nodes()

    def node(self, node_id: str) -> dict[str, Any] | None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(self.key(NODES), node_id)
        pipe.hget(self.key(DEAD_NODES), node_id)
        live, dead = pipe.execute()
        info = _loads(live if live is not None else dead)
        if info is not None:
            info["node_id"] = node_id
        return info

    def mark_node_dead(self, node_id: str, cause: str, fence: Fence | None = None) -> bool:
        """Record a live node's death once (its heartbeat goes, its entry moves to the dead
        nodes, the oldest beyond max_dead_nodes are dropped); True if this call recorded it.

        Raises NotLeaderError (writing nothing) if ``fence`` no longer holds the lease."""
        raw = self.redis.hget(self.key(NODES), node_id)
        if raw is None:
            return False
        info = _loads(raw)
        info.update(state="DEAD", death_cause=cause, end_time=time.time())
        recorded = self._eval(
            _MARK_NODE_DEAD_SCRIPT,
            [
                *self._fence_keys(),
                self.key(NODES),
                self.key(DEAD_NODES),
                self.key(DEAD_NODE_INDEX),
                self.key(HEARTBEAT, node_id=node_id),
                self.key(NODE_VIEW_EPOCH),
                self.key(NODE_VIEW_CHANGES),
            ],
            [
                *self._fence_args(fence),
                node_id,
                raw,
                _dumps(info),
                self.channel(NODE_CHANNEL),
                _dumps({"node_id": node_id, "state": "DEAD", "cause": cause}),
                time.time(),
                self.max_dead_nodes,
                TRIM_BATCH,
                os.urandom(8).hex(),
            ],
            fence,
        )
        return bool(recorded)

    # -- jobs -------------------------------------------------------------------------------
    def next_job_id(self) -> int:
        return int(self.redis.incr(self.key(JOB_COUNTER)))

    def add_job(self, job_id: str, info: dict[str, Any]) -> None:
        info = {**info, "state": "RUNNING", "start_time": time.time()}
        self.redis.hset(self.key(JOBS), job_id, _dumps(info))

    def finish_job(self, job_id: str) -> bool:
        """Record a job's end once and publish it; the functions only it used are deleted and
        the oldest finished jobs beyond max_finished_jobs dropped. True if this call ended it."""
        info = _loads(self.redis.hget(self.key(JOBS), job_id)) or {}
        info.update(state="FINISHED", end_time=time.time())
        user = f"job:{job_id}"
        return bool(
            self._eval(
                _FINISH_JOB_SCRIPT,
                [self.key(JOBS), self.key(FINISHED_JOBS)],
                [
                    job_id,
                    _dumps(info),
                    self.channel(JOB_CHANNEL),
                    _dumps({"job_id": job_id, "state": "FINISHED"}),
                    time.time(),
                    self.max_finished_jobs,
                    TRIM_BATCH,
                    *self._function_prefixes(),
                    self.key(FUNCTION_USES, user=user),
                    user,
                ],
            )
        )

    def jobs(self) -> dict[str, dict[str, Any]]:
        return {k.decode(): _loads(v) for k, v in self.redis.hgetall(self.key(JOBS)).items()}

    # -- functions --------------------------------------------------------------------------
    def _function_prefixes(self) -> list[str]:
        return [self._key_prefix(FUNCTION), self._key_prefix(FUNCTION_USERS)]

    def export_function(self, key: str, blob: bytes, job_id: str | None = None) -> None:
        """Store a pickled function or class under its content hash (idempotent).

        With ``job_id`` the job is recorded as a user of it, and the blob is deleted when its
        last user is gone (the job finished, the actors created with it died). A job that
        already finished keeps it only ORPHAN_FUNCTION_TTL_SECONDS. Without a job it is kept
        for good."""
        if not job_id:
            self.redis.set(self.key(FUNCTION, key=key), blob, nx=True)
            return
        user = f"job:{job_id}"
        self._eval(
            _EXPORT_FUNCTION_SCRIPT,
            [
                self.key(FUNCTION, key=key),
                self.key(FUNCTION_USERS, key=key),
                self.key(FUNCTION_USES, user=user),
                self.key(FINISHED_JOBS),
            ],
            [blob, user, job_id, ORPHAN_FUNCTION_TTL_SECONDS, key],
        )

    def function(self, key: str) -> bytes | None:
        return self.redis.get(self.key(FUNCTION, key=key))

    # -- internal KV ------------------------------------------------------------------------
    def kv_put(self, key: bytes | str, value: bytes, overwrite: bool = True, namespace="") -> bool:
        """Set key; with overwrite=False only when absent. True when a new key was added."""
        table = self.key(KV, namespace=namespace)
        if overwrite:
            return bool(self.redis.hset(table, key, value))
        return bool(self.redis.hsetnx(table, key, value))

    def kv_get(self, key: bytes | str, namespace: str = "") -> bytes | None:
        return self.redis.hget(self.key(KV, namespace=namespace), key)

    def kv_del(self, key: bytes | str, namespace: str = "") -> int:
        return int(self.redis.hdel(self.key(KV, namespace=namespace), key))

    def kv_exists(self, key: bytes | str, namespace: str = "") -> bool:
        return bool(self.redis.hexists(self.key(KV, namespace=namespace), key))

    def kv_keys(self, prefix: bytes | str = b"", namespace: str = "") -> list[bytes]:
        if isinstance(prefix, str):
            prefix = prefix.encode()
        keys = self.redis.hkeys(self.key(KV, namespace=namespace))
        return [k for k in keys if k.startswith(prefix)]

    # -- pub/sub ----------------------------------------------------------------------------
    def publish(self, channel: str, message: dict[str, Any]) -> None:
        self.redis.publish(self.channel(channel), _dumps(message))

    def subscribe(self, channels: Iterable[str]) -> redis.client.PubSub:
        """A PubSub subscribed to the given channels (names relative to the cluster).
        A subscriber thread should use ``subscription`` instead."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(*[self.channel(c) for c in channels])
        return pubsub

    def subscription(
        self,
        channels: Iterable[str] = (),
        patterns: Iterable[str] = (),
        ping_seconds: float = PUBSUB_PING_SECONDS,
        silence_seconds: float | None = None,
    ) -> Subscription:
        """A Subscription to channels and channel patterns (relative to the cluster), for a
        subscriber thread; a hung Redis is detected within ping_seconds + silence_seconds
        (default: the socket timeout). Raises redis.ConnectionError/TimeoutError if Redis
        cannot be reached."""
        channels = [self.channel(c) for c in channels]
        patterns = [self.channel(p) for p in patterns]
        if not channels and not patterns:
            raise ValueError("a subscription needs a channel or a pattern")
        pubsub = self.subscriber.pubsub()
        try:
            if channels:
                pubsub.subscribe(*channels)
            if patterns:
                pubsub.psubscribe(*patterns)
        except BaseException:
            pubsub.close()
            raise
        return Subscription(pubsub, ping_seconds, silence_seconds or self.socket_timeout)

    @staticmethod
    def decode_message(message: dict[str, Any]) -> dict[str, Any] | None:
        if message is None or message.get("type") not in ("message", "pmessage"):
            return None
        return _loads(message["data"])

    # -- leadership of the control loop ----------------------------------------------------
    def hold_leadership(self, holder: str, ttl: float) -> int:
        """Take or renew the control loop's lease for ttl seconds. Returns the fencing epoch
        (> 0) while ``holder`` holds it, 0 while someone else does.

        Renewing keeps the epoch; taking a free lease (first time, or after it expired, even
        if we held it before) increments it: a new epoch is a new tenure. Write with
        ``Fence(holder, epoch)``."""
        if not holder:
            raise ValueError("a lease holder needs an id")
        if ttl <= 0:
            raise ValueError(f"a lease lasts a positive time, got {ttl!r}")
        epoch = self._eval(
            LUA_LEASE_HOLD,
            self._fence_keys(),
            [holder, max(1, int(ttl * 1000)), int(time.time() * 1_000_000)],
        )
        return int(epoch)

    def leader(self) -> str | None:
        raw = self.redis.get(self.key(LEADER))
        return raw.decode() if raw is not None else None

    def release_leadership(self, holder: str) -> None:
        """Give the lease up if ``holder`` holds it (a standby takes over at once)."""
        self._eval(LUA_LEASE_RELEASE, [self.key(LEADER)], [holder])

    # -- requests to the control loop -------------------------------------------------------
    def push_request(self, kind: str, /, **fields: Any) -> None:
        """Queue one request for the control loop: ``push_request("kill_actor",
        actor_id=..., no_restart=True)``. Raises ValueError for an unknown kind (or an empty
        id) and TypeError for missing, unexpected or mistyped fields, queueing nothing."""
        self.redis.rpush(self.key(REQUESTS), encode_request(kind, fields))

    def push_requests(self, requests: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Queue (kind, fields) requests in order, in one round trip; raises as push_request
        (before queueing any of them)."""
        entries = [encode_request(kind, fields) for kind, fields in requests]
        if entries:
            self.redis.rpush(self.key(REQUESTS), *entries)

    def take_requests(
        self, fence: Fence, timeout: float, limit: int = 256
    ) -> list[Request | BadRequest]:
        """The leader's next requests (up to limit), oldest first, waiting up to timeout
        seconds (at most ``blocking_max``) for the first. They move to the taken list, where
        they stay until ``ack_requests``: a leader that dies before acknowledging them leaves
        them to ``unacked_requests`` of the next one. Entries that are not valid requests
        come as BadRequest: acknowledge them too.

        Raises NotLeaderError (taking nothing) if ``fence`` no longer holds the lease. After a
        redis ConnectionError/TimeoutError the requests may have moved without their reply
        reaching us: read ``unacked_requests()`` before taking more."""
        requests = self.key(REQUESTS)
        wait = max(0.0, min(timeout, self.blocking_max))
        # Rotating the head onto itself changes nothing but blocks until there is one: the
        # fenced script pipelined behind it runs as soon as it returns.
        before = (("BLMOVE", requests, requests, "LEFT", "LEFT", wait),) if wait > 0 else ()
        keys = [*self._fence_keys(), requests, self.key(REQUESTS_TAKEN)]
        replies = self._eval(
            _TAKE_REQUESTS_SCRIPT, keys, [*self._fence_args(fence), max(0, limit)], fence, before
        )
        taken = replies[-1] if before else replies
        return [decode_request(raw) for raw in taken]

    def unacked_requests(self, limit: int = 10_000) -> list[Request | BadRequest]:
        """The requests taken and not acknowledged (by this leader or one that died), oldest
        first: what a new leader handles before taking more."""
        raws = self.redis.lrange(self.key(REQUESTS_TAKEN), 0, max(0, limit) - 1) if limit else []
        return [decode_request(raw) for raw in raws]

    def ack_requests(self, fence: Fence, requests: Iterable[Request | BadRequest]) -> int:
        """Remove handled requests from the taken list (one entry each); the number removed.
        Raises NotLeaderError (removing nothing) if ``fence`` no longer holds the lease."""
        raws = [request.raw for request in requests]
        if not raws:
            return 0
        keys = [*self._fence_keys(), self.key(REQUESTS_TAKEN)]
        return int(self._eval(_ACK_REQUESTS_SCRIPT, keys, [*self._fence_args(fence), *raws], fence))

    # -- actors -----------------------------------------------------------------------------
    def create_actor(
        self,
        actor_id: str,
        info: dict[str, Any],
        spec: bytes,
        function_keys: Iterable[str] = (),
    ) -> None:
        """Record a new actor with its creation spec and ask the control loop to place it,
        atomically, in one round trip. The actor is recorded as a user of ``function_keys``
        (its class): they outlive its job while it lives (a detached actor)."""
        request = encode_request("create_actor", {"actor_id": actor_id})
        user = f"actor:{actor_id}"
        self._eval(
            _CREATE_ACTOR_SCRIPT,
            [
                self.key(ACTORS),
                self.key(ACTOR_SPECS),
                self.key(REQUESTS),
                self.key(FUNCTION_USES, user=user),
            ],
            [
                actor_id,
                _dumps(info),
                spec,
                request,
                self._key_prefix(FUNCTION_USERS),
                user,
                *function_keys,
            ],
        )

    def actor_spec(self, actor_id: str) -> bytes | None:
        """An actor's creation spec; None once it is dead."""
        return self.redis.hget(self.key(ACTOR_SPECS), actor_id)

    def actor(self, actor_id: str) -> dict[str, Any] | None:
        return self.table_get(ACTORS, actor_id)

    def actors(self, actor_ids: list[str]) -> list[dict[str, Any] | None]:
        """The entries of several actors (None for those not in the table), in one round
        trip."""
        if not actor_ids:
            return []
        return [_loads(raw) for raw in self.redis.hmget(self.key(ACTORS), actor_ids)]

    def update_actor(self, actor_id: str, info: dict[str, Any], fence: Fence | None = None) -> None:
        """Write an actor's entry and announce it on the actor's channel, atomically.

        When info's state is DEAD its creation spec is deleted, its functions are released
        (deleted if it was their last user), and the oldest dead actors beyond
        max_dead_actors are dropped with the names still bound to them. Raises NotLeaderError
        (writing nothing) if ``fence`` no longer holds the lease."""
        user = f"actor:{actor_id}"
        self._eval(
            _UPDATE_ACTOR_SCRIPT,
            [
                *self._fence_keys(),
                self.key(ACTORS),
                self.key(ACTOR_SPECS),
                self.key(DEAD_ACTORS),
                self.key(NAMED_ACTORS),
                self.key(FUNCTION_USES, user=user),
            ],
            [
                *self._fence_args(fence),
                actor_id,
                _dumps(info),
                self.actor_channel(actor_id),
                "1" if info.get("state") == ACTOR_DEAD else "",
                time.time(),
                self.max_dead_actors,
                TRIM_BATCH,
                *self._function_prefixes(),
                user,
            ],
            fence,
        )

    def actor_channel(self, actor_id: str) -> str:
        return self.channel(ACTOR_STATE_CHANNEL.format(actor_id=actor_id))

    # -- placement groups -------------------------------------------------------------------
    def create_placement_group(self, pg_id: str, info: dict[str, Any]) -> None:
        """Record a placement group and ask the control loop to reserve it (one command,
        atomic: the entry never exists without its request). Raises TypeError if info is not
        a JSON object."""
        request = encode_request("create_pg", {"pg_id": pg_id, "info": info})
        keys = [self.key(PLACEMENT_GROUPS), self.key(REQUESTS)]
        self._eval(_PUT_AND_REQUEST_SCRIPT, keys, [pg_id, _dumps(info), request])

    def placement_group(self, pg_id: str) -> dict[str, Any] | None:
        return self.table_get(PLACEMENT_GROUPS, pg_id)

    def update_placement_groups(
        self, updates: list[tuple[str, dict[str, Any]]], fence: Fence | None = None
    ) -> None:
        """Write placement groups' entries and announce each on its channel, in order, in
        one command (the control loop writes a burst of state changes at once). Groups
        entering REMOVED join the removed index; the oldest beyond max_removed_pgs are
        dropped with the names still bound to them. Raises NotLeaderError (writing nothing)
        if ``fence`` no longer holds the lease."""
        if not updates:
            return
        args: list[Any] = [
            *self._fence_args(fence),
            self.channel(PG_STATE_CHANNEL.format(pg_id="")),
            time.time(),
            self.max_removed_pgs,
            TRIM_BATCH,
        ]
        for pg_id, info in updates:
            args += [pg_id, _dumps(info), "1" if info.get("state") == PG_REMOVED else ""]
        keys = [
            *self._fence_keys(),
            self.key(PLACEMENT_GROUPS),
            self.key(REMOVED_PGS),
            self.key(NAMED_PGS),
        ]
        self._eval(_UPDATE_PGS_SCRIPT, keys, args, fence)

    # -- named entries (actors, placement groups) ------------------------------------------
    def claim_name(self, table: str, namespace: str, name: str, value: str) -> str:
        """Bind name to value unless already bound; return the value bound now."""
        current = self._eval(
            _CLAIM_NAME_SCRIPT, [self.key(table)], [_name_field(namespace, name), value]
        )
        return current.decode() if isinstance(current, bytes) else current

    def lookup_name(self, table: str, namespace: str, name: str) -> str | None:
        raw = self.redis.hget(self.key(table), _name_field(namespace, name))
        return raw.decode() if raw is not None else None

    def release_name(self, table: str, namespace: str, name: str, value: str) -> None:
        """Unbind name if it is bound to value (atomically)."""
        self._eval(_RELEASE_NAME_SCRIPT, [self.key(table)], [_name_field(namespace, name), value])

    def names(self, table: str, namespace: str | None = None) -> list[tuple[str, str, str]]:
        """(namespace, name, value) for every binding, optionally within one namespace."""
        result = []
        for field, value in self.redis.hgetall(self.key(table)).items():
            ns, _, name = field.decode().partition("\0")
            if namespace is None or ns == namespace:
                result.append((ns, name, value.decode()))
        return result

    # -- generic JSON tables (actors, placement groups) ------------------------------------
    def table_put(
        self, table: str, entry_id: str, info: dict[str, Any], channel: str | None = None
    ):
        pipe = self.redis.pipeline()
        pipe.hset(self.key(table), entry_id, _dumps(info))
        if channel is not None:
            pipe.publish(self.channel(channel), _dumps({"id": entry_id, **info}))
        pipe.execute()

    def table_get(self, table: str, entry_id: str) -> dict[str, Any] | None:
        return _loads(self.redis.hget(self.key(table), entry_id))

    def table_all(self, table: str) -> dict[str, dict[str, Any]]:
        return {k.decode(): _loads(v) for k, v in self.redis.hgetall(self.key(table)).items()}

    def table_delete(self, table: str, entry_id: str) -> None:
        self.redis.hdel(self.key(table), entry_id)
