"""Every Redis key and Lua script of the durable queues.

Keys live under the cluster's prefix (``redray:{cluster}:``, from redray/gcs.py) and then
``dq:``, so a queue belongs to one cluster and ``redis-cli --scan --pattern
'redray:default:dq:*'`` shows all of it:

    dq:queues                      set of queue names ever enqueued to
    dq:q:{queue}:p{level}          stream of job ids, one per priority level (0 first)
    dq:q:{queue}:delayed           sorted set job id -> due time (ms): countdown/eta/retries
    dq:q:{queue}:dlq               stream of jobs that failed for good (job id, error)
    dq:q:{queue}:consumers         hash consumer name -> JSON (pid, host, started)
    dq:q:{queue}:hb:{consumer}     a consumer's heartbeat: exists while it lives (TTL)
    dq:q:{queue}:rate              token bucket of the queue's rate limit
    dq:job:{job_id}                hash: the job (name, payload, options) and its state/result
    dq:rate:{name}                 token bucket of one job name's rate limit
    dq:chord:{chord_id}            hash: size, members counted, failures, callback id
    dq:chord:{chord_id}:done       set of header members already counted
    dq:beat:{schedule}:lease       the beat scheduler's lease (holder, TTL)
    dq:beat:{schedule}:epoch       the fencing epoch of that lease
    dq:beat:{schedule}:last        hash entry name -> due time (ms) of its last firing

Every write that touches several keys is one script below, so a crash (of a consumer, a
driver or Redis) never leaves half of one: a job is in exactly one of its queue's streams,
its delayed set, or nowhere (finished), and its hash says which state it is in.

Scripts compute some key names from a prefix given in ARGV (a job's hash, the stream of a
chain's next job): redray's scripts already require a single Redis shard.
"""

from __future__ import annotations

from redray.gcs import LUA_LEASE_HOLD, LUA_LEASE_RELEASE, Gcs

GROUP = "redray"  # the consumer group every queue's streams are read through
LEVELS = 4  # priority levels: 0 is read first (kombu's Redis transport steps 0, 3, 6, 9)
DLQ_MAXLEN = 100_000  # dead-lettered jobs kept per queue (approximate trimming)

QUEUES = "dq:queues"
STREAM = "dq:q:{queue}:p{level}"
DELAYED = "dq:q:{queue}:delayed"
DLQ = "dq:q:{queue}:dlq"
CONSUMERS = "dq:q:{queue}:consumers"
HEARTBEAT = "dq:q:{queue}:hb:{consumer}"
QUEUE_RATE = "dq:q:{queue}:rate"
JOB = "dq:job:{job_id}"
NAME_RATE = "dq:rate:{name}"
CHORD = "dq:chord:{chord_id}"
CHORD_DONE = "dq:chord:{chord_id}:done"
BEAT_LEASE = "dq:beat:{schedule}:lease"
BEAT_EPOCH = "dq:beat:{schedule}:epoch"
BEAT_LAST = "dq:beat:{schedule}:last"

# Job states (Celery's names).
PENDING = "PENDING"
STARTED = "STARTED"
RETRY = "RETRY"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
REVOKED = "REVOKED"
READY_STATES = frozenset({SUCCESS, FAILURE, REVOKED})
RESULT_TTL_FROM_JOB = "job"


class QueueKeys:
    """The keys of one cluster's durable queues."""

    def __init__(self, gcs: Gcs):
        self.gcs = gcs
        self.prefix = gcs.prefix

    def key(self, template: str, **fields: str) -> str:
        return self.gcs.key(template, **fields)

    def queues(self) -> str:
        return self.key(QUEUES)

    def streams(self, queue: str) -> list[str]:
        return [self.key(STREAM, queue=queue, level=str(level)) for level in range(LEVELS)]

    def delayed(self, queue: str) -> str:
        return self.key(DELAYED, queue=queue)

    def dlq(self, queue: str) -> str:
        return self.key(DLQ, queue=queue)

    def consumers(self, queue: str) -> str:
        return self.key(CONSUMERS, queue=queue)

    def heartbeat(self, queue: str, consumer: str) -> str:
        return self.key(HEARTBEAT, queue=queue, consumer=consumer)

    def heartbeat_prefix(self, queue: str) -> str:
        return self.key(HEARTBEAT, queue=queue, consumer="")

    def queue_rate(self, queue: str) -> str:
        return self.key(QUEUE_RATE, queue=queue)

    def name_rate(self, name: str) -> str:
        return self.key(NAME_RATE, name=name)

    def job(self, job_id: str) -> str:
        return self.key(JOB, job_id=job_id)

    @property
    def job_prefix(self) -> str:
        return self.key(JOB, job_id="")

    @property
    def queue_prefix(self) -> str:
        """What a stream key starts with before its queue name (scripts append
        ``{queue}:p{level}``)."""
        return self.prefix + "dq:q:"

    def chord(self, chord_id: str) -> str:
        return self.key(CHORD, chord_id=chord_id)

    def chord_done(self, chord_id: str) -> str:
        return self.key(CHORD_DONE, chord_id=chord_id)

    @property
    def chord_prefix(self) -> str:
        return self.key(CHORD, chord_id="")

    def beat(self, schedule: str) -> list[str]:
        return [
            self.key(BEAT_LEASE, schedule=schedule),
            self.key(BEAT_EPOCH, schedule=schedule),
            self.key(BEAT_LAST, schedule=schedule),
        ]


# -- Lua ------------------------------------------------------------------------------------
# Shared functions. `push` puts a job id on its queue's stream for its level, making the
# stream and the consumer group when the stream is new. `release` does so for a job parked
# as waiting (a chain's next step, a chord's callback) exactly once: HDEL of the `waiting`
# field answers 1 only to its first caller.
_LUA_COMMON = """
local GROUP = 'redray'
local function push(queue_prefix, queue, level, job_id)
  local stream = queue_prefix .. queue .. ':p' .. level
  if redis.call('EXISTS', stream) == 0 then
    redis.call('XGROUP', 'CREATE', stream, GROUP, '0', 'MKSTREAM')
  end
  redis.call('XADD', stream, '*', 'id', job_id)
end
local function release(queue_prefix, job_key, job_id, parent_id)
  if redis.call('HDEL', job_key, 'waiting') == 1 then
    local queue = redis.call('HGET', job_key, 'queue')
    local level = redis.call('HGET', job_key, 'level') or '0'
    if parent_id ~= '' then redis.call('HSET', job_key, 'parent', parent_id) end
    push(queue_prefix, queue, level, job_id)
    return 1
  end
  return 0
end
local function expire_job(job_key, ttl)
  if tonumber(ttl) > 0 then redis.call('PEXPIRE', job_key, ttl) else redis.call('PERSIST', job_key) end
end
"""

# Enqueue one job. KEYS: job hash, queue set, delayed set. ARGV: queue prefix, queue, level,
# job id, due (ms, 0 = now), now (ms), waiting ('1': parked until a parent releases it), then
# field/value pairs of the job hash. Answers 1, or 0 when a job with this id exists already
# (de-duplication by job id: nothing is written).
ENQUEUE = (
    _LUA_COMMON
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local fields = {}
for i = 8, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], 'state', 'PENDING', 'created', ARGV[6], unpack(fields))
redis.call('SADD', KEYS[2], ARGV[2])
if ARGV[7] == '1' then
  redis.call('HSET', KEYS[1], 'waiting', '1')
elseif tonumber(ARGV[5]) > tonumber(ARGV[6]) then
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])
else
  push(ARGV[1], ARGV[2], ARGV[3], ARGV[4])
end
return 1
"""
)

# Take a job a consumer just read or claimed: skip (and acknowledge) jobs gone, revoked or
# expired; otherwise mark it STARTED by this consumer and return what running it needs,
# with the result of the parent (a chain's previous step) or of the chord's header.
_LUA_TAKE = """
local function take(stream, eid, job_id, consumer, now, job_prefix, out, level)
  local job_key = job_prefix .. job_id
  local job = redis.call('HMGET', job_key, 'state', 'expires', 'name', 'payload', 'opts',
                         'retries', 'deliveries', 'parent', 'header', 'result_ttl')
  local state = job[1]
  if not state then
    redis.call('XACK', stream, GROUP, eid)
    redis.call('XDEL', stream, eid)
    return
  end
  if state == 'SUCCESS' or state == 'FAILURE' or state == 'REVOKED' then
    redis.call('XACK', stream, GROUP, eid)
    redis.call('XDEL', stream, eid)
    return
  end
  if job[2] and job[2] ~= '' and tonumber(job[2]) <= tonumber(now) then
    redis.call('HSET', job_key, 'state', 'REVOKED', 'error', 'expired', 'finished', now)
    expire_job(job_key, job[10] or '0')
    redis.call('XACK', stream, GROUP, eid)
    redis.call('XDEL', stream, eid)
    return
  end
  local deliveries = redis.call('HINCRBY', job_key, 'deliveries', 1)
  redis.call('HSET', job_key, 'state', 'STARTED', 'consumer', consumer, 'started', now)
  local parent_result = false
  if job[8] then parent_result = redis.call('HGET', job_prefix .. job[8], 'result') or false end
  local header = false
  if job[9] then
    header = {}
    for member in string.gmatch(job[9], '[^,]+') do
      header[#header + 1] = redis.call('HGET', job_prefix .. member, 'result') or ''
    end
  end
  out[#out + 1] = {level, eid, job_id, job[3], job[4], job[5], job[6] or '0',
                   tostring(deliveries), parent_result, header}
end
"""

# Move due delayed jobs to their streams (atomically, so a job moves once whoever runs it),
# then read up to COUNT new jobs, highest priority level first, within the queue's rate
# limit. KEYS: the level streams (LEVELS of them), delayed set, queue rate bucket.
# ARGV: consumer, count, now (ms), job prefix, queue prefix, queue, promote limit,
# rate per second (0: none), burst.
# Answers {jobs, next due time (ms) or '', ms to wait for a rate token (0 if none needed)}.
FETCH = (
    _LUA_COMMON
    + _LUA_TAKE
    + """
local LEVELS = #KEYS - 2
local delayed, bucket = KEYS[LEVELS + 1], KEYS[LEVELS + 2]
local consumer, count, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local job_prefix, queue_prefix, queue = ARGV[4], ARGV[5], ARGV[6]
local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, tonumber(ARGV[7]))
for _, job_id in ipairs(due) do
  redis.call('ZREM', delayed, job_id)
  local job_key = job_prefix .. job_id
  if redis.call('EXISTS', job_key) == 1 then
    push(queue_prefix, queue, redis.call('HGET', job_key, 'level') or '0', job_id)
  end
end
local rate_wait = 0
local rate = tonumber(ARGV[8])
local tokens = 0
if rate > 0 then
  local burst = tonumber(ARGV[9])
  local state = redis.call('HMGET', bucket, 'tokens', 'ts')
  tokens = tonumber(state[1] or burst)
  local ts = tonumber(state[2] or now)
  tokens = math.min(burst, tokens + (now - ts) * rate / 1000)
  if tokens < 1 then
    rate_wait = math.ceil((1 - tokens) * 1000 / rate)
    count = 0
  else
    count = math.min(count, math.floor(tokens))
  end
end
local out = {}
for level = 1, LEVELS do
  if #out >= count then break end
  if redis.call('EXISTS', KEYS[level]) == 0 then
    redis.call('XGROUP', 'CREATE', KEYS[level], GROUP, '0', 'MKSTREAM')
  end
  local read = redis.call('XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', count - #out,
                          'STREAMS', KEYS[level], '>')
  if read then
    for _, entry in ipairs(read[1][2]) do
      take(KEYS[level], entry[1], entry[2][2], consumer, now, job_prefix, out, level - 1)
    end
  end
end
if rate > 0 then
  redis.call('HSET', bucket, 'tokens', tostring(tokens - #out), 'ts', now)
  redis.call('PEXPIRE', bucket, 3600000)
end
local nxt = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
return {out, nxt[2] or '', rate_wait}
"""
)

# Take over jobs whose consumer died: entries pending for at least IDLE ms whose consumer's
# heartbeat key is gone. A live consumer's jobs are never taken, however long they run.
# Consumers that are gone and hold nothing are removed from the group and the registry.
# KEYS: the level streams, consumer registry. ARGV: consumer, count, now, job prefix,
# heartbeat prefix, idle (ms). Answers the jobs taken, as FETCH does.
RECLAIM = (
    _LUA_COMMON
    + _LUA_TAKE
    + """
local LEVELS = #KEYS - 1
local registry = KEYS[LEVELS + 1]
local consumer, count, now = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local job_prefix, hb_prefix, idle = ARGV[4], ARGV[5], tonumber(ARGV[6])
local out = {}
local alive = {}
local function is_alive(name)
  if alive[name] == nil then alive[name] = redis.call('EXISTS', hb_prefix .. name) == 1 end
  return alive[name]
end
for level = 1, LEVELS do
  local stream = KEYS[level]
  if redis.call('EXISTS', stream) == 1 then
    local pending = redis.call('XPENDING', stream, GROUP, 'IDLE', idle, '-', '+', count)
    for _, entry in ipairs(pending) do
      if #out >= count then break end
      if entry[2] ~= consumer and not is_alive(entry[2]) then
        local claimed = redis.call('XCLAIM', stream, GROUP, consumer, idle, entry[1])
        for _, c in ipairs(claimed) do
          if c[2] then
            take(stream, c[1], c[2][2], consumer, now, job_prefix, out, level - 1)
          else
            redis.call('XACK', stream, GROUP, c[1])
          end
        end
      end
    end
    for _, info in ipairs(redis.call('XINFO', 'CONSUMERS', stream, GROUP)) do
      local name, held, since = info[2], info[4], info[6]
      if held == 0 and since > idle and name ~= consumer and not is_alive(name) then
        redis.call('XGROUP', 'DELCONSUMER', stream, GROUP, name)
      end
    end
  end
end
for _, name in ipairs(redis.call('HKEYS', registry)) do
  if not is_alive(name) then redis.call('HDEL', registry, name) end
end
return out
"""
)

# A job's run is over: store its state and result, then acknowledge and delete its stream
# entry (the result is stored before the ack, in one script). On SUCCESS, release waiting
# children (a chain's next step); a chord member is counted once and the member that
# completes the header releases the callback (or fails it when a member failed). A FAILURE
# is also written to the dead-letter stream.
# KEYS: job hash, stream (of the entry), dead-letter stream. ARGV: entry id, state, now,
# result ttl (ms, or RESULT_TTL_FROM_JOB: the job's own), result, error, traceback, job prefix, queue prefix, chord prefix,
# dlq maxlen, job id.
FINISH = (
    _LUA_COMMON
    + """
local job_key, stream, dlq = KEYS[1], KEYS[2], KEYS[3]
local eid, state, now, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local job_prefix, queue_prefix, chord_prefix, job_id = ARGV[8], ARGV[9], ARGV[10], ARGV[12]
if ttl == 'job' then ttl = redis.call('HGET', job_key, 'result_ttl') or '0' end
if redis.call('EXISTS', job_key) == 1 then
  redis.call('HSET', job_key, 'state', state, 'result', ARGV[5], 'error', ARGV[6],
             'traceback', ARGV[7], 'finished', now)
  local links = redis.call('HMGET', job_key, 'children', 'chord', 'name', 'queue')
  if state == 'SUCCESS' and links[1] then
    for child in string.gmatch(links[1], '[^,]+') do
      release(queue_prefix, job_prefix .. child, child, job_id)
    end
  elseif links[1] then
    for child in string.gmatch(links[1], '[^,]+') do
      if redis.call('HGET', job_prefix .. child, 'waiting') then
        redis.call('HSET', job_prefix .. child, 'state', 'FAILURE', 'error',
                   'a previous step of the chain failed: ' .. job_id, 'finished', now)
        redis.call('HDEL', job_prefix .. child, 'waiting')
        expire_job(job_prefix .. child, ttl)
      end
    end
  end
  if links[2] then
    local chord = chord_prefix .. links[2]
    if redis.call('SADD', chord .. ':done', job_id) == 1 then
      if state ~= 'SUCCESS' then redis.call('HINCRBY', chord, 'failed', 1) end
      local counted = redis.call('HINCRBY', chord, 'counted', 1)
      local meta = redis.call('HMGET', chord, 'size', 'callback', 'failed')
      if counted == tonumber(meta[1]) then
        local callback = job_prefix .. meta[2]
        if tonumber(meta[3] or '0') > 0 then
          if redis.call('HDEL', callback, 'waiting') == 1 then
            redis.call('HSET', callback, 'state', 'FAILURE', 'finished', now, 'error',
                       'ChordError: a header job of the chord failed: ' .. job_id)
            expire_job(callback, ttl)
          end
        else
          release(queue_prefix, callback, meta[2], '')
        end
        redis.call('PEXPIRE', chord, 86400000)
        redis.call('PEXPIRE', chord .. ':done', 86400000)
      end
    end
  end
  if state == 'FAILURE' then
    redis.call('XADD', dlq, 'MAXLEN', '~', ARGV[11], '*', 'id', job_id, 'name', links[3] or '',
               'error', ARGV[6], 'time', now)
  end
  expire_job(job_key, ttl)
end
if eid ~= '' then
  redis.call('XACK', stream, GROUP, eid)
  redis.call('XDEL', stream, eid)
end
return 1
"""
)

# Run the job again later (a retry, or a job held back by its name's rate limit): state,
# retries and error are updated, the job is parked in the delayed set and its entry
# acknowledged. KEYS: job hash, stream, delayed set. ARGV: entry id, job id, due (ms),
# state, retries, error, traceback.
DEFER = """
local GROUP = 'redray'
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'state', ARGV[4], 'retries', ARGV[5], 'error', ARGV[6],
             'traceback', ARGV[7])
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
end
redis.call('XACK', KEYS[2], GROUP, ARGV[1])
redis.call('XDEL', KEYS[2], ARGV[1])
return 1
"""

# Revoke a job that has not finished: it will not start (a consumer that reads it skips it);
# a delayed one leaves its set. KEYS: job hash. ARGV: queue prefix, job id, now, ttl (ms).
# Answers 1, or 0 when the job had finished already (or does not exist).
REVOKE = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'SUCCESS' or state == 'FAILURE' or state == 'REVOKED' then return 0 end
local queue = redis.call('HGET', KEYS[1], 'queue')
redis.call('ZREM', ARGV[1] .. queue .. ':delayed', ARGV[2])
redis.call('HSET', KEYS[1], 'state', 'REVOKED', 'error', 'revoked', 'finished', ARGV[3])
redis.call('HDEL', KEYS[1], 'waiting')
if tonumber(ARGV[4]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return 1
"""

# Take one token from a name's bucket. KEYS: bucket. ARGV: now (ms), rate per second, burst.
# Answers 0 when a token was taken, else the ms until one is there.
TAKE_TOKEN = """
local rate, burst, now = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[1])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1] or burst)
local ts = tonumber(state[2] or now)
tokens = math.min(burst, tokens + (now - ts) * rate / 1000)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) * 1000 / rate) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', ARGV[1])
redis.call('PEXPIRE', KEYS[1], 3600000)
return wait
"""

# Register a chord: its size and callback, before any header job can finish.
# KEYS: chord hash. ARGV: size, callback job id.
CHORD_CREATE = """
redis.call('HSETNX', KEYS[1], 'size', ARGV[1])
redis.call('HSETNX', KEYS[1], 'callback', ARGV[2])
redis.call('HSETNX', KEYS[1], 'counted', '0')
return 1
"""

# Move dead-lettered jobs back to their queue: each one found in the dead-letter stream is
# reset to PENDING (retries 0) and pushed again. KEYS: dead-letter stream. ARGV: queue
# prefix, queue, job prefix, count. Answers how many went back.
REDRIVE = (
    _LUA_COMMON
    + """
local entries = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', tonumber(ARGV[4]))
local moved = 0
for _, entry in ipairs(entries) do
  local job_id = entry[2][2]
  local job_key = ARGV[3] .. job_id
  if redis.call('EXISTS', job_key) == 1 then
    redis.call('HSET', job_key, 'state', 'PENDING', 'retries', '0', 'deliveries', '0')
    redis.call('HDEL', job_key, 'result', 'error', 'traceback', 'finished')
    redis.call('PERSIST', job_key)
    push(ARGV[1], ARGV[2], redis.call('HGET', job_key, 'level') or '0', job_id)
    moved = moved + 1
  end
  redis.call('XDEL', KEYS[1], entry[1])
end
return moved
"""
)

# The beat scheduler's lease, taken and given up as the control loop's (redray/gcs.py):
# KEYS: lease, epoch; answers the epoch, 0 while someone else holds it.
BEAT_HOLD = LUA_LEASE_HOLD
BEAT_RELEASE = LUA_LEASE_RELEASE

# Fire one periodic entry for one due time, fenced: only the lease holder at its epoch
# fires, and a due time is fired once (the entry's last fired time only moves forward), so
# a scheduler that stalled past its lease, or a second one, cannot fire it again.
# KEYS: lease, epoch, last-fired hash, then ENQUEUE's keys. ARGV: holder, epoch, entry,
# due (ms), then ENQUEUE's ARGV. Answers 1 fired, 0 already fired, error NOTLEADER.
BEAT_FIRE = (
    _LUA_COMMON
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return redis.error_reply('NOTLEADER')
end
local last = tonumber(redis.call('HGET', KEYS[3], ARGV[3]) or '-1')
if tonumber(ARGV[4]) <= last then return 0 end
redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
local job_key, queues, delayed = KEYS[4], KEYS[5], KEYS[6]
if redis.call('EXISTS', job_key) == 1 then return 0 end
local fields = {}
for i = 12, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', job_key, 'state', 'PENDING', 'created', ARGV[10], unpack(fields))
redis.call('SADD', queues, ARGV[6])
push(ARGV[5], ARGV[6], ARGV[7], ARGV[8])
return 1
"""
)

# TAKE the entries a blocking XREADGROUP delivered. ARGV: consumer, now, job prefix, then
# (stream, entry id, job id) triples.
TAKE_ENTRIES = (
    _LUA_COMMON
    + _LUA_TAKE
    + """
local out = {}
local streams = {}
for i = 4, #ARGV, 3 do
  local stream = ARGV[i]
  local level = tonumber(string.match(stream, ':p(%d+)$'))
  take(stream, ARGV[i + 1], ARGV[i + 2], ARGV[1], ARGV[2], ARGV[3], out, level)
end
return out
"""
)
