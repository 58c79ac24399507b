"""Redis keys and scripts of submitted jobs, on the cluster prefix of `redray.gcs`.

A job is a hash (``job:{id}``) whose ``status`` moves PENDING -> RUNNING -> SUCCEEDED /
FAILED / STOPPED, only through the scripts below, so a stop racing a start or a finish is
decided in one place. Pending jobs wait in one FIFO list; the leader moves the head to a node's
intake list (fenced by its epoch) and records it in the active table until it ends. Output is
a capped stream per job. Every call goes through the Gcs client, whose sockets time out.
"""

from __future__ import annotations

import json
import time
from typing import Any

from redray.gcs import LUA_FENCE, Fence, Gcs

JOB = "jobsub:{sid}"  # hash: status, message, node_id, info (JSON), times, exit code, stop
QUEUE = "jobsub_queue"  # list of pending submission ids not yet given to a node, oldest first
INDEX = "jobsub_index"  # sorted set submission id -> submit time (what list_jobs shows)
FINISHED = "jobsub_finished"  # sorted set submission id -> end time (trimmed beyond a cap)
ACTIVE = "jobsub_active"  # hash submission id -> JSON {node_id, resources}, placed and not ended
INTAKE = "jobsub_intake:{node_id}"  # list of submission ids a node's raylet is to run
WAKE = "jobsub_wake"  # a list of at most one entry: wakes the leader's queue pass
LOG = "jobsub_log:{sid}"  # stream of output chunks (field "d"), capped

MAX_FINISHED_JOBS = 10_000  # finished jobs kept (with their logs); older ones deleted
LOG_MAX_CHUNKS = 1_000  # a job's log keeps its newest chunks (each at most LOG_CHUNK_BYTES)
LOG_CHUNK_BYTES = 16 * 1024
TERMINAL = ("STOPPED", "SUCCEEDED", "FAILED")

_SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'status', 'PENDING', 'info', ARGV[2], 'submit_time', ARGV[3],
  'message', 'Job is waiting for its entrypoint resources.')
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('DEL', KEYS[4])
redis.call('RPUSH', KEYS[4], '1')
return 1
"""

# KEYS: fence (2), job, queue, active, intake. ARGV: fence (2), sid, node id, active entry.
_ASSIGN = """
if redis.call('HGET', KEYS[3], 'status') ~= 'PENDING' then
  redis.call('LREM', KEYS[4], 1, ARGV[3])
  return 0
end
redis.call('LREM', KEYS[4], 1, ARGV[3])
redis.call('HSET', KEYS[3], 'node_id', ARGV[4],
  'message', 'Job is starting on node ' .. ARGV[4] .. '.')
redis.call('HSET', KEYS[5], ARGV[3], ARGV[5])
redis.call('RPUSH', KEYS[6], ARGV[3])
return 1
"""

# KEYS: job. ARGV: node id, start time.
_START = """
if redis.call('HGET', KEYS[1], 'status') ~= 'PENDING'
   or redis.call('HGET', KEYS[1], 'node_id') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'RUNNING', 'start_time', ARGV[2],
  'message', 'Job is currently running.')
return 1
"""

# KEYS: job, active, finished, wake, job prefix, log prefix, index.
# ARGV: sid, status, message, end time, exit code ('' if none), cap, batch.
_FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'PENDING' and status ~= 'RUNNING' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'message', ARGV[3], 'end_time', ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'driver_exit_code', ARGV[5]) end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
redis.call('DEL', KEYS[4])
redis.call('RPUSH', KEYS[4], '1')
local excess = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[6])
if excess > 0 then
  if excess > tonumber(ARGV[7]) then excess = tonumber(ARGV[7]) end
  for _, old in ipairs(redis.call('ZRANGE', KEYS[3], 0, excess - 1)) do
    redis.call('DEL', KEYS[5] .. old, KEYS[6] .. old)
    redis.call('ZREM', KEYS[7], old)
    redis.call('ZREM', KEYS[3], old)
  end
end
return 1
"""

# KEYS: job, queue, active, finished, wake. ARGV: sid, end time.
_STOP = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'PENDING' then
  redis.call('LREM', KEYS[2], 1, ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('HSET', KEYS[1], 'status', 'STOPPED', 'end_time', ARGV[2],
    'message', 'Job was stopped before it started.')
  redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
  redis.call('DEL', KEYS[5])
  redis.call('RPUSH', KEYS[5], '1')
  return 'stopped'
end
if status == 'RUNNING' then
  redis.call('HSET', KEYS[1], 'stop', '1')
  return 'stopping'
end
return 'terminal'
"""

# KEYS: job, log, index, finished. ARGV: sid.
_DELETE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status ~= 'STOPPED' and status ~= 'SUCCEEDED' and status ~= 'FAILED' then return status end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return 'deleted'
"""


class JobKeys:
    """The job tables of one cluster (thread-safe, as the Gcs client it wraps)."""

    def __init__(self, gcs: Gcs):
        self.gcs = gcs

    def _job(self, sid: str) -> str:
        return self.gcs.key(JOB, sid=sid)

    # -- clients ----------------------------------------------------------------------------
    def submit(self, sid: str, info: dict[str, Any]) -> bool:
        """Queue a new job; False if the submission id is taken."""
        keys = [self._job(sid), self.gcs.key(QUEUE), self.gcs.key(INDEX), self.gcs.key(WAKE)]
        return bool(self.gcs._eval(_SUBMIT, keys, [sid, json.dumps(info), time.time()]))

    def job(self, sid: str) -> dict[str, Any] | None:
        """A job's fields (info decoded), or None."""
        raw = self.gcs.redis.hgetall(self._job(sid))
        return _decode(sid, raw) if raw else None

    def jobs(self) -> list[dict[str, Any]]:
        """Every job kept, oldest submission first."""
        sids = [s.decode() for s in self.gcs.redis.zrange(self.gcs.key(INDEX), 0, -1)]
        pipe = self.gcs.redis.pipeline(transaction=False)
        for sid in sids:
            pipe.hgetall(self._job(sid))
        return [_decode(sid, raw) for sid, raw in zip(sids, pipe.execute(), strict=True) if raw]

    def stop(self, sid: str) -> str:
        """'stopped' (it was pending), 'stopping' (its node ends it), 'terminal' or 'missing'."""
        keys = [
            self._job(sid),
            self.gcs.key(QUEUE),
            self.gcs.key(ACTIVE),
            self.gcs.key(FINISHED),
            self.gcs.key(WAKE),
        ]
        reply = self.gcs._eval(_STOP, keys, [sid, time.time()])
        return reply.decode() if isinstance(reply, bytes) else reply

    def delete(self, sid: str) -> str:
        """'deleted', 'missing', or the status of a job not finished yet (left alone)."""
        keys = [
            self._job(sid),
            self.gcs.key(LOG, sid=sid),
            self.gcs.key(INDEX),
            self.gcs.key(FINISHED),
        ]
        reply = self.gcs._eval(_DELETE, keys, [sid])
        return reply.decode() if isinstance(reply, bytes) else reply

    def read_log(self, sid: str, after: str = "-", block_ms: int | None = None) -> tuple:
        """(chunks of text after stream id `after`, the last id read)."""
        key = self.gcs.key(LOG, sid=sid)
        if block_ms is None:
            start = "-" if after == "-" else f"({after}"
            entries = self.gcs.redis.xrange(key, start, "+")
        else:
            block = min(block_ms, int(self.gcs.blocking_max * 1000))
            reply = self.gcs.redis.xread({key: after if after != "-" else "0"}, block=block)
            entries = reply[0][1] if reply else []
        text = [fields[b"d"].decode(errors="replace") for _, fields in entries]
        last = entries[-1][0].decode() if entries else after
        return text, last

    # -- the leader -------------------------------------------------------------------------
    def wait_for_work(self, timeout: float) -> None:
        """Block until a submission or an end wakes the queue pass, or timeout passes."""
        self.gcs.redis.blpop([self.gcs.key(WAKE)], timeout=min(timeout, self.gcs.blocking_max))

    def queue_head(self, count: int) -> list[str]:
        return [s.decode() for s in self.gcs.redis.lrange(self.gcs.key(QUEUE), 0, count - 1)]

    def infos(self, sids: list[str]) -> list[dict[str, Any] | None]:
        pipe = self.gcs.redis.pipeline(transaction=False)
        for sid in sids:
            pipe.hget(self._job(sid), "info")
        return [json.loads(raw) if raw else None for raw in pipe.execute()]

    def active(self) -> dict[str, dict[str, Any]]:
        raw = self.gcs.redis.hgetall(self.gcs.key(ACTIVE))
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def assign(self, fence: Fence, sid: str, node_id: str, resources: dict) -> bool:
        """Give a pending job to a node (fenced: NotLeaderError once the tenure ended)."""
        keys = [
            *self.gcs._fence_keys(),
            self._job(sid),
            self.gcs.key(QUEUE),
            self.gcs.key(ACTIVE),
            self.gcs.key(INTAKE, node_id=node_id),
        ]
        entry = json.dumps({"node_id": node_id, "resources": resources})
        args = [*self.gcs._fence_args(fence), sid, node_id, entry]
        return bool(self.gcs._eval(LUA_FENCE + _ASSIGN, keys, args, fence=fence))

    def drop_intake(self, node_id: str) -> None:
        """Forget the intake list of a node that died (nobody will take from it)."""
        self.gcs.redis.delete(self.gcs.key(INTAKE, node_id=node_id))

    # -- nodes ------------------------------------------------------------------------------
    def take_assigned(self, node_id: str, timeout: float) -> str | None:
        """The next job given to this node, waiting at most timeout."""
        key = self.gcs.key(INTAKE, node_id=node_id)
        reply = self.gcs.redis.blpop([key], timeout=min(timeout, self.gcs.blocking_max))
        return reply[1].decode() if reply else None

    def start(self, sid: str, node_id: str) -> bool:
        """PENDING -> RUNNING on this node; False if it was stopped meanwhile."""
        return bool(self.gcs._eval(_START, [self._job(sid)], [node_id, time.time()]))

    def stop_requested(self, sid: str) -> bool:
        return self.gcs.redis.hget(self._job(sid), "stop") is not None

    def append_log(self, sid: str, data: bytes) -> None:
        self.gcs.redis.xadd(
            self.gcs.key(LOG, sid=sid), {"d": data}, maxlen=LOG_MAX_CHUNKS, approximate=True
        )

    def finish(self, sid: str, status: str, message: str, exit_code: int | None = None) -> bool:
        """Record a job's end (once: False if it had ended already)."""
        keys = [
            self._job(sid),
            self.gcs.key(ACTIVE),
            self.gcs.key(FINISHED),
            self.gcs.key(WAKE),
            self.gcs.key(JOB, sid=""),
            self.gcs.key(LOG, sid=""),
            self.gcs.key(INDEX),
        ]
        code = "" if exit_code is None else str(exit_code)
        args = [sid, status, message, time.time(), code, MAX_FINISHED_JOBS, 1000]
        return bool(self.gcs._eval(_FINISH, keys, args))


def _decode(sid: str, raw: dict) -> dict[str, Any]:
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    info = json.loads(fields.pop("info", "{}"))
    return {"submission_id": sid, **info, **fields}
