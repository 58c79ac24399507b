"""The global control store: every Redis key and every Redis command redray uses.

Redis holds what must be shared between nodes or must outlive a process: the node table and
heartbeats, jobs, exported functions, the internal KV, the actor and placement-group tables,
and the pub/sub channels that announce node and actor state changes. Nothing else in redray
talks to Redis, and nothing on the task hot path comes here.

All keys live under ``redray:{cluster}:`` so several clusters can share one Redis. Tables are
Redis hashes of JSON (readable with ``redis-cli``); function bodies are raw bytes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis

DEFAULT_CLUSTER = "default"

# Key templates, relative to the cluster prefix.
TOKEN = "token"
CONFIG = "config"
NODES = "nodes"  # hash node_id -> JSON node info
HEARTBEAT = "hb:{node_id}"  # JSON available resources, expires when the node stops beating
JOB_COUNTER = "job_counter"
JOBS = "jobs"  # hash job_id -> JSON job info
FUNCTION = "fn:{key}"  # cloudpickled function or class, exported once by content hash
KV = "kv:{namespace}"  # hash key -> value (Ray's internal KV)
ACTORS = "actors"  # hash actor_id -> JSON actor info
NAMED_ACTORS = "named_actors"  # hash "namespace\0name" -> actor_id
PLACEMENT_GROUPS = "pgs"  # hash pg_id -> JSON placement group info
NAMED_PGS = "named_pgs"  # hash "namespace\0name" -> pg_id
LEADER = "leader"  # the GCS control loop's lease: holder id, with a TTL
ACTOR_SPECS = "actor_specs"  # hash actor_id -> pickled creation spec (class, arguments)
REQUESTS = "requests"  # list of pickled requests to the control loop (create/kill actors, ...)

# Pub/sub channels, relative to the cluster prefix.
NODE_CHANNEL = "ch:nodes"
ACTOR_CHANNEL = "ch:actors"
PG_STATE_CHANNEL = "ch:pg:{pg_id}"  # one placement group's state changes
JOB_CHANNEL = "ch:jobs"
WORKER_CHANNEL = "ch:workers"  # a driver or worker process died
ACTOR_STATE_CHANNEL = "ch:actor:{actor_id}"  # one actor's state changes

# Renew the lease only if we still hold it; take it if nobody does.
_LEADER_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
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

# Take up to ARGV[1] items from the head of a list, atomically.
_TAKE_SCRIPT = """
if tonumber(ARGV[1]) < 1 then
  return {}
end
local items = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #items > 0 then
  redis.call('LTRIM', KEYS[1], #items, -1)
end
return items
"""

# Write a table entry and queue a request for the control loop, atomically.
_PUT_AND_REQUEST_SCRIPT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[3])
return 1
"""

# Write table entries (ARGV[2], ARGV[3]), (ARGV[4], ARGV[5]), ... and publish each entry on
# the channel ARGV[1] .. its id.
_PUT_AND_PUBLISH_SCRIPT = """
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('PUBLISH', ARGV[1] .. ARGV[i], ARGV[i + 1])
end
return 1
"""


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _loads(raw: bytes | str | None) -> Any:
    return None if raw is None else json.loads(raw)


def _name_field(namespace: str, name: str) -> str:
    return f"{namespace}\0{name}"


class Gcs:
    """A client of one cluster's tables in Redis."""

    def __init__(
        self,
        url: str | None = None,
        cluster: str = DEFAULT_CLUSTER,
        client: redis.Redis | None = None,
    ):
        if client is None and url is None:
            raise ValueError("Gcs needs a Redis URL or a client")
        self.url = url
        self.cluster = cluster
        self.prefix = f"redray:{cluster}:"
        self._client = client
        self._scripts: dict[str, Any] = {}

    @property
    def redis(self) -> redis.Redis:
        """The Redis client, made (and the redis package imported) on first use: a worker
        that only runs tasks never needs it, and the package costs ~16 MB per process."""
        if self._client is None:
            import redis

            self._client = redis.Redis.from_url(
                self.url, socket_connect_timeout=5, health_check_interval=30
            )
        return self._client

    def _script(self, source: str) -> Any:
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.redis.register_script(source)
        return script

    def _round_trip(self, *commands: tuple) -> list[Any]:
        """Send commands in one write and read their raw replies, on a pooled connection.

        What a redis-py pipeline does, without its per-call bookkeeping (about half its
        client CPU): for the paths run once per request under load. An error reply is
        raised once every reply is read, so the connection stays usable."""
        from redis.exceptions import ResponseError

        pool = self.redis.connection_pool
        conn = pool.get_connection()
        replies: list[Any] = []
        error: Exception | None = None
        try:
            conn.send_packed_command(conn.pack_commands(commands))
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except ResponseError as exc:
                    error = error or exc
                    replies.append(exc)
        except BaseException:
            conn.disconnect()  # replies may be left unread: never reuse it as it is
            raise
        finally:
            pool.release(conn)
        if error is not None:
            raise error
        return replies

    def key(self, template: str, **fields: str) -> str:
        return self.prefix + template.format(**fields)

    def channel(self, name: str) -> str:
        return self.prefix + name

    def ping(self) -> bool:
        return bool(self.redis.ping())

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

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

    def cluster_config(self) -> dict[str, Any]:
        return _loads(self.redis.get(self.key(CONFIG))) or {}

    # -- nodes ------------------------------------------------------------------------------
    def register_node(self, node_id: str, info: dict[str, Any], ttl: float) -> None:
        """Add a node as alive and start its heartbeat."""
        info = {**info, "state": "ALIVE", "start_time": time.time()}
        pipe = self.redis.pipeline()
        pipe.hset(self.key(NODES), node_id, _dumps(info))
        pipe.set(
            self.key(HEARTBEAT, node_id=node_id),
            _dumps(info.get("available", {})),
            px=int(ttl * 1000),
        )
        pipe.publish(self.channel(NODE_CHANNEL), _dumps({"node_id": node_id, "state": "ALIVE"}))
        pipe.execute()

    def heartbeat(
        self,
        node_id: str,
        available: dict[str, float],
        ttl: float,
        load: dict[str, Any] | None = None,
        total: dict[str, float] | None = None,
    ) -> None:
        """Renew a node's liveness with its free (and, as they change, total) resources."""
        payload = {"available": available, "load": load or {}}
        if total is not None:
            payload["total"] = total
        self.redis.set(self.key(HEARTBEAT, node_id=node_id), _dumps(payload), px=int(ttl * 1000))

    def nodes(self) -> list[dict[str, Any]]:
        """Every node ever registered, with `alive` from its heartbeat and `available`."""
        infos = self.redis.hgetall(self.key(NODES))
        if not infos:
            return []
        ids = [k.decode() for k in infos]
        beats = self.redis.mget([self.key(HEARTBEAT, node_id=i) for i in ids])
        result = []
        for node_id, beat in zip(ids, beats, strict=True):
            info = _loads(infos[node_id.encode()])
            info["node_id"] = node_id
            beat = _loads(beat)
            info["alive"] = info.get("state") == "ALIVE" and beat is not None
            if beat is not None:
                info["available"] = beat.get("available", beat)
                info["load"] = beat.get("load", {})
                if "total" in beat:
                    info["resources"] = beat["total"]
            elif not info["alive"]:
                info["available"] = {}
            result.append(info)
        return result

    def node(self, node_id: str) -> dict[str, Any] | None:
        info = _loads(self.redis.hget(self.key(NODES), node_id))
        if info is not None:
            info["node_id"] = node_id
        return info

    def mark_node_dead(self, node_id: str, cause: str) -> bool:
        """Record a node's death once; True if this call recorded it."""
        raw = self.redis.hget(self.key(NODES), node_id)
        info = _loads(raw)
        if info is None or info.get("state") == "DEAD":
            return False
        info.update(state="DEAD", death_cause=cause, end_time=time.time())
        pipe = self.redis.pipeline()
        pipe.hset(self.key(NODES), node_id, _dumps(info))
        pipe.delete(self.key(HEARTBEAT, node_id=node_id))
        pipe.publish(
            self.channel(NODE_CHANNEL),
            _dumps({"node_id": node_id, "state": "DEAD", "cause": cause}),
        )
        pipe.execute()
        return True

    # -- jobs -------------------------------------------------------------------------------
    def next_job_id(self) -> int:
        return int(self.redis.incr(self.key(JOB_COUNTER)))

    def add_job(self, job_id: str, info: dict[str, Any]) -> None:
        info = {**info, "state": "RUNNING", "start_time": time.time()}
        self.redis.hset(self.key(JOBS), job_id, _dumps(info))

    def finish_job(self, job_id: str) -> None:
        info = _loads(self.redis.hget(self.key(JOBS), job_id)) or {}
        info.update(state="FINISHED", end_time=time.time())
        pipe = self.redis.pipeline()
        pipe.hset(self.key(JOBS), job_id, _dumps(info))
        pipe.publish(self.channel(JOB_CHANNEL), _dumps({"job_id": job_id, "state": "FINISHED"}))
        pipe.execute()

    def jobs(self) -> dict[str, dict[str, Any]]:
        return {k.decode(): _loads(v) for k, v in self.redis.hgetall(self.key(JOBS)).items()}

    # -- functions --------------------------------------------------------------------------
    def export_function(self, key: str, blob: bytes) -> None:
        """Store a pickled function or class under its content hash (idempotent)."""
        self.redis.set(self.key(FUNCTION, key=key), blob, nx=True)

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
        """A PubSub subscribed to the given channels (names relative to the cluster)."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(*[self.channel(c) for c in channels])
        return pubsub

    @staticmethod
    def decode_message(message: dict[str, Any]) -> dict[str, Any] | None:
        if message is None or message.get("type") != "message":
            return None
        return _loads(message["data"])

    # -- leadership of the control loop ----------------------------------------------------
    def hold_leadership(self, holder: str, ttl: float) -> bool:
        """Take or renew the control loop's lease; False while someone else holds it."""
        return bool(
            self._script(_LEADER_SCRIPT)(keys=[self.key(LEADER)], args=[holder, int(ttl * 1000)])
        )

    def leader(self) -> str | None:
        raw = self.redis.get(self.key(LEADER))
        return raw.decode() if raw is not None else None

    def release_leadership(self, holder: str) -> None:
        if self.leader() == holder:
            self.redis.delete(self.key(LEADER))

    # -- requests to the control loop -------------------------------------------------------
    def push_request(self, *requests: bytes) -> None:
        """Queue requests for the control loop, in order, in one round trip."""
        self.redis.rpush(self.key(REQUESTS), *requests)

    def pop_requests(self, timeout: float, limit: int = 256) -> list[bytes]:
        """The queued requests for the control loop (up to limit), oldest first, waiting up
        to timeout seconds for the first.

        One round trip: BLPOP and, pipelined behind it, a script taking what else is queued
        (Redis runs it once the BLPOP returns), so a burst costs what one request does."""
        key = self.key(REQUESTS)
        first, more = self._round_trip(
            ("BLPOP", key, timeout), ("EVAL", _TAKE_SCRIPT, 1, key, max(0, limit - 1))
        )
        return ([first[1]] if first is not None else []) + list(more)

    # -- actors -----------------------------------------------------------------------------
    def create_actor(self, actor_id: str, info: dict[str, Any], spec: bytes) -> None:
        """Record a new actor and ask the control loop to place it (one round trip)."""
        import pickle

        pipe = self.redis.pipeline()
        pipe.hset(self.key(ACTORS), actor_id, _dumps(info))
        pipe.hset(self.key(ACTOR_SPECS), actor_id, spec)
        pipe.rpush(self.key(REQUESTS), pickle.dumps(("create_actor", actor_id)))
        pipe.execute()

    def actor_spec(self, actor_id: str) -> bytes | None:
        return self.redis.hget(self.key(ACTOR_SPECS), actor_id)

    def actor(self, actor_id: str) -> dict[str, Any] | None:
        return self.table_get(ACTORS, actor_id)

    def update_actor(self, actor_id: str, info: dict[str, Any]) -> None:
        """Write an actor's entry and announce it on the actor's channel."""
        pipe = self.redis.pipeline()
        pipe.hset(self.key(ACTORS), actor_id, _dumps(info))
        pipe.publish(self.channel(ACTOR_STATE_CHANNEL.format(actor_id=actor_id)), _dumps(info))
        pipe.execute()

    def actor_channel(self, actor_id: str) -> str:
        return self.channel(ACTOR_STATE_CHANNEL.format(actor_id=actor_id))

    # -- placement groups -------------------------------------------------------------------
    def create_placement_group(self, pg_id: str, info: dict[str, Any]) -> None:
        """Record a placement group and ask the control loop to reserve it (one command,
        atomic: the entry never exists without its request)."""
        import pickle

        request = pickle.dumps(("create_pg", pg_id, info))
        keys = (self.key(PLACEMENT_GROUPS), self.key(REQUESTS))
        self._round_trip(("EVAL", _PUT_AND_REQUEST_SCRIPT, 2, *keys, pg_id, _dumps(info), request))

    def placement_group(self, pg_id: str) -> dict[str, Any] | None:
        return self.table_get(PLACEMENT_GROUPS, pg_id)

    def update_placement_groups(self, updates: list[tuple[str, dict[str, Any]]]) -> None:
        """Write placement groups' entries and announce each on its channel, in order, in
        one command (the control loop writes a burst of state changes at once)."""
        args = [self.channel(PG_STATE_CHANNEL.format(pg_id=""))]
        for pg_id, info in updates:
            args += [pg_id, _dumps(info)]
        self._round_trip(("EVAL", _PUT_AND_PUBLISH_SCRIPT, 1, self.key(PLACEMENT_GROUPS), *args))

    # -- named entries (actors, placement groups) ------------------------------------------
    def claim_name(self, table: str, namespace: str, name: str, value: str) -> str:
        """Bind name to value unless already bound; return the value bound now."""
        current = self._script(_CLAIM_NAME_SCRIPT)(
            keys=[self.key(table)], args=[_name_field(namespace, name), value]
        )
        return current.decode() if isinstance(current, bytes) else current

    def lookup_name(self, table: str, namespace: str, name: str) -> str | None:
        raw = self.redis.hget(self.key(table), _name_field(namespace, name))
        return raw.decode() if raw is not None else None

    def release_name(self, table: str, namespace: str, name: str, value: str) -> None:
        field = _name_field(namespace, name)
        if self.lookup_name(table, namespace, name) == value:
            self.redis.hdel(self.key(table), field)

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
