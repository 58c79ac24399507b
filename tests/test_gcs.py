"""Unit tests of `redray.gcs.Gcs` against fakeredis (with Lua, as every multi-key write is a
script). The same behaviour on a real redis-server, Sentinel failover and hung or restarted
servers are in test_gcs_redis.py."""

from __future__ import annotations

import json
import pickle
import time

import fakeredis
import pytest
import redis
from conftest import wait_for

from redray import gcs as gcs_schema
from redray.gcs import (
    ACTORS,
    NAMED_ACTORS,
    NAMED_PGS,
    BadRequest,
    Fence,
    Gcs,
    HeartbeatStatus,
    NodeDeadError,
    NotLeaderError,
    Request,
)

pytest.importorskip("lupa", reason="fakeredis runs Lua scripts only with fakeredis[lua]")


@pytest.fixture
def server():
    return fakeredis.FakeServer()


@pytest.fixture
def gcs(server):
    g = Gcs(client=fakeredis.FakeRedis(server=server), cluster="c1")
    yield g
    g.close()


def other_client(server, cluster: str = "c1") -> Gcs:
    """A second process's view of the same Redis."""
    return Gcs(client=fakeredis.FakeRedis(server=server), cluster=cluster)


NODE_INFO = {
    "raylet_address": ["127.0.0.1", 1234],
    "node_ip_address": "127.0.0.1",
    "resources": {"CPU": 4.0},
    "available": {"CPU": 4.0},
    "is_head": True,
}


def snapshot(gcs: Gcs) -> dict:
    """Every key of the Redis with its value (what a refused write must leave unchanged)."""
    r = gcs.redis
    state = {}
    for key in r.keys("*"):
        kind = r.type(key)
        if kind == b"string":
            value = r.get(key)
        elif kind == b"hash":
            value = r.hgetall(key)
        elif kind == b"list":
            value = r.lrange(key, 0, -1)
        elif kind == b"set":
            value = r.smembers(key)
        else:
            value = r.zrange(key, 0, -1, withscores=True)
        state[key] = (kind, value)
    return state


def leader(gcs: Gcs, holder: str = "head-a", ttl: float = 30) -> Fence:
    epoch = gcs.hold_leadership(holder, ttl)
    assert epoch > 0
    return Fence(holder, epoch)


def lose_lease(gcs: Gcs) -> None:
    """The lease expires (its holder stalled past the TTL)."""
    gcs.redis.delete(gcs.key(gcs_schema.LEADER))


# -- construction ----------------------------------------------------------------------------
def test_needs_url_or_client():
    with pytest.raises(ValueError):
        Gcs()


def test_unsupported_url_scheme_is_refused_at_construction():
    with pytest.raises(ValueError, match="unsupported Redis URL"):
        Gcs("http://localhost:6379")


def test_ping_and_key_schema(gcs):
    assert gcs.ping() is True
    assert gcs.key("nodes") == "redray:c1:nodes"
    assert gcs.key("hb:{node_id}", node_id="n1") == "redray:c1:hb:n1"
    assert gcs.channel("ch:nodes") == "redray:c1:ch:nodes"


def test_connections_have_timeouts_health_checks_and_retries():
    gcs = Gcs("redis://127.0.0.1:1/0", "x")
    kwargs = gcs.redis.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == gcs_schema.SOCKET_TIMEOUT_SECONDS
    assert kwargs["socket_connect_timeout"] == gcs_schema.CONNECT_TIMEOUT_SECONDS
    assert kwargs["health_check_interval"] == gcs_schema.HEALTH_CHECK_SECONDS
    assert kwargs["retry"].get_retries() == gcs_schema.RETRY_ATTEMPTS
    # Nothing listens there: a typed error, after the short retries, not a hang.
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        gcs.ping()
    assert time.monotonic() - started < 5
    gcs.close()


def test_sentinel_url_names_sentinels_service_db_and_passwords():
    gcs = Gcs(
        "redis+sentinel://:p%40ss@127.0.0.1:1,[::1]:2,localhost/mymaster/0?sentinel_password=sent",
        "x",
    )
    pool = gcs.redis.connection_pool
    assert pool.service_name == "mymaster"
    assert pool.connection_kwargs["password"] == "p@ss"
    assert pool.connection_kwargs["db"] == 0
    assert pool.connection_kwargs["socket_timeout"] == gcs_schema.SOCKET_TIMEOUT_SECONDS
    sentinels = [s.connection_pool.connection_kwargs for s in gcs._sentinels[0].sentinels]
    assert [(s["host"], s["port"]) for s in sentinels] == [
        ("127.0.0.1", 1),
        ("::1", 2),
        ("localhost", gcs_schema.SENTINEL_DEFAULT_PORT),
    ]
    assert all(s["password"] == "sent" for s in sentinels)
    assert all(s["socket_timeout"] == gcs_schema.SOCKET_TIMEOUT_SECONDS for s in sentinels)
    gcs.close()


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://127.0.0.1:26379",
        "redis+sentinel://127.0.0.1:26379/",
        "redis+sentinel://127.0.0.1:26379/svc/notadb",
        "redis+sentinel://127.0.0.1:port/svc",
        "redis+sentinel:///svc",
    ],
)
def test_bad_sentinel_urls_are_refused_at_construction(url):
    with pytest.raises(ValueError):
        Gcs(url, "x")


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_bad_retention_setting_is_refused(monkeypatch, value):
    monkeypatch.setenv("REDRAY_MAX_DEAD_ACTORS", value)
    with pytest.raises(ValueError, match="REDRAY_MAX_DEAD_ACTORS"):
        Gcs(client=fakeredis.FakeRedis())


def test_retention_defaults_follow_ray(monkeypatch):
    for name in ("DEAD_ACTORS", "DEAD_NODES", "REMOVED_PGS", "FINISHED_JOBS"):
        monkeypatch.delenv(f"REDRAY_MAX_{name}", raising=False)
    gcs = Gcs(client=fakeredis.FakeRedis())
    assert gcs.max_dead_actors == 100_000  # Ray's maximum_gcs_destroyed_actor_cached_count
    assert gcs.max_dead_nodes == 1_000  # Ray's maximum_gcs_dead_node_cached_count
    assert gcs.max_removed_pgs > 0 and gcs.max_finished_jobs > 0


# -- cluster token and config -------------------------------------------------------------
def test_init_cluster_keeps_the_first_token(gcs, server):
    assert gcs.cluster_token() is None
    assert gcs.cluster_exists() is False
    assert gcs.cluster_config() == {}
    assert gcs.init_cluster(b"first", {"created_by": "n1"}) == b"first"
    # A second head (or a restart) must not replace the token everybody already uses.
    assert other_client(server).init_cluster(b"second", {"created_by": "n2"}) == b"first"
    assert gcs.cluster_token() == b"first"
    assert gcs.cluster_exists() is True
    assert gcs.cluster_config() == {"created_by": "n1"}


# -- nodes and heartbeats -----------------------------------------------------------------
def test_register_node_and_lookup(gcs):
    gcs.register_node("n1", NODE_INFO, ttl=30)
    [node] = gcs.nodes()
    assert node["node_id"] == "n1"
    assert node["alive"] is True
    assert node["state"] == "ALIVE"
    assert node["resources"] == {"CPU": 4.0}
    assert node["raylet_address"] == ["127.0.0.1", 1234]
    single = gcs.node("n1")
    assert single["node_id"] == "n1" and single["is_head"] is True
    assert gcs.node("missing") is None


def test_no_nodes(gcs):
    assert gcs.nodes() == []
    assert gcs.live_nodes() == []


def test_register_node_is_idempotent(gcs):
    info = {**NODE_INFO, "start_time": 123.0}
    gcs.register_node("n1", info, ttl=30)
    gcs.register_node("n1", {**info, "available": {"CPU": 2.0}}, ttl=30)
    [node] = gcs.nodes()
    assert node["start_time"] == 123.0
    assert node["available"] == {"CPU": 2.0}


def test_heartbeat_updates_available_resources(gcs):
    gcs.register_node("n1", NODE_INFO, ttl=30)
    assert gcs.heartbeat("n1", {"CPU": 1.5}, ttl=30, load={"pending": 3}) is HeartbeatStatus.OK
    [node] = gcs.nodes()
    assert node["available"] == {"CPU": 1.5}
    assert node["load"] == {"pending": 3}


def test_node_without_heartbeat_is_not_alive(gcs):
    """A node whose heartbeat key expired is reported not alive (failure detection)."""
    gcs.register_node("n1", NODE_INFO, ttl=0.2)
    gcs.register_node("n2", NODE_INFO, ttl=30)
    assert all(n["alive"] for n in gcs.live_nodes())
    wait_for(
        lambda: {n["node_id"]: n["alive"] for n in gcs.live_nodes()} == {"n1": False, "n2": True},
        timeout=5,
    )


def test_heartbeats_keep_a_node_alive(gcs):
    gcs.register_node("n1", NODE_INFO, ttl=0.2)
    deadline = time.monotonic() + 0.6  # three TTLs, beating faster than the TTL
    while time.monotonic() < deadline:
        assert gcs.heartbeat("n1", {"CPU": 4.0}, ttl=0.2) is HeartbeatStatus.OK
        assert gcs.nodes()[0]["alive"]
        time.sleep(0.05)


def test_mark_node_dead_once_and_its_heartbeat_is_refused(gcs, server):
    gcs.register_node("n1", NODE_INFO, ttl=30)
    gcs.register_node("n2", NODE_INFO, ttl=30)
    fence = leader(gcs)
    assert gcs.mark_node_dead("n1", "killed", fence) is True
    assert other_client(server).mark_node_dead("n1", "again", fence) is False
    assert gcs.mark_node_dead("missing", "x", fence) is False
    assert [n["node_id"] for n in gcs.live_nodes()] == ["n2"]
    dead = next(n for n in gcs.nodes() if n["node_id"] == "n1")
    assert dead["alive"] is False
    assert dead["state"] == "DEAD"
    assert dead["death_cause"] == "killed"
    assert dead["available"] == {}
    assert gcs.node("n1")["state"] == "DEAD"
    # A late heartbeat from a node declared dead does not bring it back: it learns it is dead.
    assert gcs.heartbeat("n1", {"CPU": 4.0}, ttl=30) is HeartbeatStatus.DEAD
    assert not next(n for n in gcs.nodes() if n["node_id"] == "n1")["alive"]
    assert gcs.redis.exists(gcs.key(gcs_schema.HEARTBEAT, node_id="n1")) == 0
    with pytest.raises(NodeDeadError):
        gcs.register_node("n1", NODE_INFO, ttl=30)


def test_node_changes_carry_only_the_nodes_that_changed(gcs):
    """Every node reads the view each beat: an idle cluster's read must carry no node at all
    (reading every node each time made Redis work grow with the square of the nodes)."""
    for node_id in ("n1", "n2", "n3"):
        gcs.register_node(node_id, NODE_INFO, ttl=30)
        gcs.heartbeat(node_id, {"CPU": 4.0}, ttl=30)
    view = gcs.node_changes(None)
    assert set(view.nodes) == {"n1", "n2", "n3"} and view.changed == 3
    for node_id in ("n1", "n2", "n3"):  # idle beats: the same report again
        assert gcs.heartbeat(node_id, {"CPU": 4.0}, ttl=30) is HeartbeatStatus.OK
    idle = gcs.node_changes(view)
    assert idle.changed == 0 and idle.nodes == view.nodes
    gcs.heartbeat("n2", {"CPU": 1.0}, ttl=30)
    busy = gcs.node_changes(idle)
    assert busy.changed == 1 and busy.nodes["n2"]["available"] == {"CPU": 1.0}
    assert busy.nodes["n1"] == view.nodes["n1"]
    gcs.register_node("n4", NODE_INFO, ttl=30)
    joined = gcs.node_changes(busy)
    assert joined.changed == 1 and set(joined.nodes) == {"n1", "n2", "n3", "n4"}


def test_node_changes_drop_a_dead_node_and_survive_an_emptied_redis(gcs):
    gcs.register_node("n1", NODE_INFO, ttl=30)
    gcs.register_node("n2", NODE_INFO, ttl=30)
    view = gcs.node_changes(None)
    assert gcs.mark_node_dead("n1", "killed", leader(gcs)) is True
    after = gcs.node_changes(view)
    assert set(after.nodes) == {"n2"}
    gcs.redis.flushall()  # Redis restarted without persistence: the reader starts over
    for node_id in ("n3", "n4", "n5", "n6"):  # (the change count passes the reader's)
        gcs.register_node(node_id, NODE_INFO, ttl=30)
    again = gcs.node_changes(after)
    assert set(again.nodes) == {"n3", "n4", "n5", "n6"}
    assert gcs.node_changes(again).changed == 0


def test_heartbeat_of_an_unknown_node_says_so_and_renews_nothing(gcs):
    assert gcs.heartbeat("never-registered", {"CPU": 1.0}, ttl=30) is HeartbeatStatus.UNKNOWN
    assert gcs.nodes() == []
    assert gcs.redis.keys("*") == []


def test_redis_came_back_empty_and_the_node_rejoins(gcs, server):
    gcs.init_cluster(b"tok", {"a": 1})
    gcs.register_node("n1", NODE_INFO, ttl=30)
    gcs.redis.flushall()  # Redis restarted without persistence
    assert gcs.heartbeat("n1", {"CPU": 4.0}, ttl=30) is HeartbeatStatus.UNKNOWN
    assert gcs.cluster_exists() is False
    gcs.rejoin_cluster(b"tok", "n1", NODE_INFO, ttl=30, config={"a": 1})
    assert gcs.cluster_token() == b"tok" and gcs.cluster_config() == {"a": 1}
    assert gcs.heartbeat("n1", {"CPU": 4.0}, ttl=30) is HeartbeatStatus.OK
    assert [n["node_id"] for n in gcs.live_nodes()] == ["n1"]
    # Another node rejoining with the same token changes nothing; another token is refused.
    other_client(server).rejoin_cluster(b"tok", "n2", NODE_INFO, ttl=30)
    with pytest.raises(ValueError, match="another token"):
        other_client(server).rejoin_cluster(b"other", "n3", NODE_INFO, ttl=30)
    assert {n["node_id"] for n in gcs.live_nodes()} == {"n1", "n2"}


def test_dead_nodes_beyond_the_cap_are_dropped(monkeypatch, server):
    monkeypatch.setenv("REDRAY_MAX_DEAD_NODES", "3")
    gcs = other_client(server)
    fence = leader(gcs)
    for i in range(6):
        gcs.register_node(f"n{i}", NODE_INFO, ttl=30)
        assert gcs.mark_node_dead(f"n{i}", "gone", fence)
    assert sorted(n["node_id"] for n in gcs.dead_nodes()) == ["n3", "n4", "n5"]
    assert gcs.redis.zcard(gcs.key(gcs_schema.DEAD_NODE_INDEX)) == 3


# -- jobs ---------------------------------------------------------------------------------------
def test_job_ids_are_unique_across_clients(gcs, server):
    other = other_client(server)
    ids = [gcs.next_job_id(), other.next_job_id(), gcs.next_job_id()]
    assert ids == [1, 2, 3]


def test_job_table(gcs):
    assert gcs.jobs() == {}
    gcs.add_job("01000000", {"driver_pid": 42})
    jobs = gcs.jobs()
    assert jobs["01000000"]["state"] == "RUNNING"
    assert jobs["01000000"]["driver_pid"] == 42
    assert gcs.finish_job("01000000") is True
    job = gcs.jobs()["01000000"]
    assert job["state"] == "FINISHED"
    assert job["end_time"] >= job["start_time"]
    assert job["driver_pid"] == 42
    assert gcs.finish_job("01000000") is False  # once
    assert gcs.jobs()["01000000"]["end_time"] == job["end_time"]


def test_finished_jobs_beyond_the_cap_are_dropped(monkeypatch, server):
    monkeypatch.setenv("REDRAY_MAX_FINISHED_JOBS", "2")
    gcs = other_client(server)
    gcs.add_job("running", {})
    for i in range(5):
        gcs.add_job(f"j{i}", {})
        gcs.finish_job(f"j{i}")
    assert sorted(gcs.jobs()) == ["j3", "j4", "running"]


# -- functions -------------------------------------------------------------------------------
def test_function_exported_once(gcs, server):
    assert gcs.function("abc") is None
    gcs.export_function("abc", b"first body")
    # Exports are keyed by content hash: a second export of the key never replaces it.
    other_client(server).export_function("abc", b"other body", job_id="j1")
    assert gcs.function("abc") == b"first body"
    assert other_client(server).function("abc") == b"first body"


def test_a_function_goes_with_its_last_job(gcs):
    gcs.add_job("j1", {})
    gcs.add_job("j2", {})
    gcs.export_function("shared", b"body", job_id="j1")
    gcs.export_function("shared", b"body", job_id="j2")
    gcs.export_function("only-j1", b"body", job_id="j1")
    gcs.finish_job("j1")
    assert gcs.function("only-j1") is None
    assert gcs.function("shared") == b"body"
    gcs.finish_job("j2")
    assert gcs.function("shared") is None
    assert gcs.redis.keys("*fn*") == []


def test_a_detached_actor_keeps_its_class_after_its_job(gcs):
    fence = leader(gcs)
    gcs.add_job("j1", {})
    gcs.export_function("Cls", b"class body", job_id="j1")
    gcs.create_actor("a1", {"state": "PENDING_CREATION", "detached": True}, b"spec", ["Cls"])
    gcs.finish_job("j1")
    assert gcs.function("Cls") == b"class body"  # the actor may still need a restart
    gcs.update_actor("a1", {"state": "DEAD"}, fence)
    assert gcs.function("Cls") is None
    assert gcs.redis.keys("*fn*") == []


def test_a_function_exported_after_its_job_finished_expires(gcs):
    gcs.add_job("j1", {})
    gcs.finish_job("j1")
    gcs.export_function("late", b"body", job_id="j1")
    assert gcs.function("late") == b"body"
    ttl = gcs.redis.ttl(gcs.key(gcs_schema.FUNCTION, key="late"))
    assert 0 < ttl <= gcs_schema.ORPHAN_FUNCTION_TTL_SECONDS
    assert gcs.redis.keys("*fn_u*") == []


# -- internal KV ----------------------------------------------------------------------------------
def test_kv_put_get_overwrite(gcs):
    assert gcs.kv_get(b"k") is None
    assert gcs.kv_put(b"k", b"v1") is True  # new key
    assert gcs.kv_put(b"k", b"v2") is False  # overwritten, not new
    assert gcs.kv_get(b"k") == b"v2"
    assert gcs.kv_put(b"k", b"v3", overwrite=False) is False
    assert gcs.kv_get(b"k") == b"v2"
    assert gcs.kv_put(b"fresh", b"x", overwrite=False) is True
    assert gcs.kv_get("fresh") == b"x"


def test_kv_exists_and_delete(gcs):
    gcs.kv_put("k", b"v")
    assert gcs.kv_exists("k") is True
    assert gcs.kv_del("k") == 1
    assert gcs.kv_del("k") == 0
    assert gcs.kv_exists("k") is False
    assert gcs.kv_get("k") is None


def test_kv_namespaces_are_separate(gcs):
    gcs.kv_put(b"k", b"default")
    gcs.kv_put(b"k", b"in-ns", namespace="ns")
    assert gcs.kv_get(b"k") == b"default"
    assert gcs.kv_get(b"k", namespace="ns") == b"in-ns"
    assert gcs.kv_get(b"k", namespace="other") is None
    gcs.kv_del(b"k", namespace="ns")
    assert gcs.kv_get(b"k") == b"default"


def test_kv_keys_by_prefix(gcs):
    for key in (b"job:1", b"job:2", b"actor:1"):
        gcs.kv_put(key, b"x")
    gcs.kv_put(b"job:3", b"x", namespace="ns")
    assert sorted(gcs.kv_keys(b"job:")) == [b"job:1", b"job:2"]
    assert sorted(gcs.kv_keys("job:")) == [b"job:1", b"job:2"]
    assert sorted(gcs.kv_keys()) == [b"actor:1", b"job:1", b"job:2"]
    assert gcs.kv_keys(b"job:", namespace="ns") == [b"job:3"]
    assert gcs.kv_keys(b"nothing") == []


# -- pub/sub -----------------------------------------------------------------------------------
def next_message(pubsub, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = Gcs.decode_message(pubsub.get_message(timeout=0.1))
        if message is not None:
            return message
    raise AssertionError("no pub/sub message arrived")


def test_publish_subscribe(gcs, server):
    listener = other_client(server)
    pubsub = listener.subscribe(["ch:test"])
    gcs.publish("ch:test", {"hello": 1})
    assert next_message(pubsub) == {"hello": 1}
    pubsub.close()


def test_subscription_delivers_messages_and_keeps_checking_redis_is_there(gcs, server):
    subscription = other_client(server).subscription(
        channels=["ch:test"], patterns=["ch:actor:*"], ping_seconds=0.05, silence_seconds=1
    )
    confirmed = []

    def both_confirmed() -> bool:
        message = subscription.get_message(0.05)
        if message is not None and message["type"] in ("subscribe", "psubscribe"):
            confirmed.append(message["type"])
        return len(confirmed) == 2

    wait_for(both_confirmed, timeout=5)
    # Quiet for many ping intervals: Redis answers each ping, no error.
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        assert subscription.get_message(0.05) is None
    gcs.publish("ch:test", {"a": 1})
    gcs.update_actor("a1", {"state": "ALIVE"})
    assert next_message(subscription) == {"a": 1}
    assert next_message(subscription) == {"state": "ALIVE"}
    subscription.close()


def test_subscription_needs_a_channel(gcs):
    with pytest.raises(ValueError):
        gcs.subscription()


def test_node_state_changes_are_published(gcs, server):
    pubsub = other_client(server).subscribe(["ch:nodes"])
    gcs.register_node("n1", NODE_INFO, ttl=30)
    assert next_message(pubsub) == {"node_id": "n1", "state": "ALIVE"}
    gcs.mark_node_dead("n1", "gone", leader(gcs))
    assert next_message(pubsub) == {"node_id": "n1", "state": "DEAD", "cause": "gone"}
    pubsub.close()


def test_job_finish_is_published(gcs):
    pubsub = gcs.subscribe(["ch:jobs"])
    gcs.add_job("02000000", {})
    gcs.finish_job("02000000")
    assert next_message(pubsub) == {"job_id": "02000000", "state": "FINISHED"}
    pubsub.close()


def test_decode_message_ignores_non_messages():
    assert Gcs.decode_message(None) is None
    assert Gcs.decode_message({"type": "subscribe", "data": 1}) is None
    assert Gcs.decode_message({"type": "message", "data": b'{"a": 1}'}) == {"a": 1}
    assert Gcs.decode_message({"type": "pmessage", "data": b'{"a": 2}'}) == {"a": 2}


def test_table_put_publishes_on_channel(gcs, server):
    pubsub = other_client(server).subscribe(["ch:actors"])
    gcs.table_put(ACTORS, "a1", {"state": "ALIVE"}, channel="ch:actors")
    assert next_message(pubsub) == {"id": "a1", "state": "ALIVE"}
    pubsub.close()


# -- leadership lease and fencing ---------------------------------------------------------------
def test_leadership_take_renew_refuse(gcs, server):
    other = other_client(server)
    assert gcs.leader() is None
    epoch = gcs.hold_leadership("head-a", ttl=30)
    assert epoch > 0
    assert gcs.leader() == "head-a"
    assert gcs.hold_leadership("head-a", ttl=30) == epoch  # renewing keeps the epoch
    assert other.hold_leadership("head-b", ttl=30) == 0  # a second holder is refused
    assert other.leader() == "head-a"


def test_epoch_increments_on_takeover(gcs, server):
    other = other_client(server)
    first = gcs.hold_leadership("head-a", ttl=0.2)
    assert other.hold_leadership("head-b", ttl=0.2) == 0
    second = wait_for(lambda: other.hold_leadership("head-b", ttl=30), timeout=5)
    assert second == first + 1
    assert gcs.leader() == "head-b"
    assert gcs.hold_leadership("head-a", ttl=30) == 0  # the old leader lost it
    gcs.release_leadership("head-a")  # not the holder: no effect
    other.release_leadership("head-b")
    # Taking a free lease again, even by a former holder, is a new tenure.
    assert gcs.hold_leadership("head-a", ttl=30) == second + 1


def test_renewing_keeps_leadership(gcs, server):
    other = other_client(server)
    epoch = gcs.hold_leadership("head-a", ttl=0.2)
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:
        assert gcs.hold_leadership("head-a", ttl=0.2) == epoch
        assert other.hold_leadership("head-b", ttl=0.2) == 0
        time.sleep(0.05)


def test_release_leadership_only_by_holder(gcs, server):
    other = other_client(server)
    gcs.hold_leadership("head-a", ttl=30)
    other.release_leadership("head-b")  # not the holder: no effect
    assert gcs.leader() == "head-a"
    gcs.release_leadership("head-a")
    assert gcs.leader() is None
    assert other.hold_leadership("head-b", ttl=30) > 0


def test_epochs_stay_fresh_when_redis_lost_the_counter(gcs):
    """Redis restarted empty: the counter starts again above every epoch handed out."""
    for holder in ("head-a", "head-b", "head-a"):
        last = gcs.hold_leadership(holder, ttl=30)
        gcs.release_leadership(holder)
    gcs.redis.flushall()
    epoch = gcs.hold_leadership("head-a", ttl=30)
    assert epoch > last
    assert gcs.hold_leadership("head-a", ttl=30) == epoch


def test_fence_values_are_checked(gcs):
    with pytest.raises(ValueError):
        Fence("", 1)
    with pytest.raises(ValueError):
        Fence("head-a", 0)
    with pytest.raises(TypeError):
        gcs.update_actor("a1", {"state": "ALIVE"}, fence=("head-a", 1))


def stale_writes(gcs: Gcs, fence: Fence) -> dict:
    """Every fenced write, as a stale leader would make it."""
    return {
        "update_actor": lambda: gcs.update_actor("a1", {"state": "DEAD"}, fence),
        "update_placement_groups": lambda: gcs.update_placement_groups(
            [("p1", {"state": "REMOVED"})], fence
        ),
        "mark_node_dead": lambda: gcs.mark_node_dead("n1", "stale", fence),
        "take_requests": lambda: gcs.take_requests(fence, timeout=0),
        "ack_requests": lambda: gcs.ack_requests(fence, gcs.unacked_requests()),
    }


def populate(gcs: Gcs, fence: Fence) -> None:
    """An actor, a group, a node, a queued and a taken request."""
    gcs.register_node("n1", NODE_INFO, ttl=30)
    gcs.create_actor("a1", {"state": "PENDING_CREATION"}, b"spec")
    gcs.create_placement_group("p1", {"state": "PENDING"})
    gcs.take_requests(fence, timeout=0, limit=1)
    gcs.update_actor("a1", {"state": "ALIVE"}, fence)


@pytest.mark.parametrize("write", list(stale_writes(None, None)))
@pytest.mark.parametrize("how", ["another took the lease", "the lease expired", "retaken"])
def test_a_stale_leader_writes_nothing(gcs, server, write, how):
    fence = leader(gcs, "head-a")
    populate(gcs, fence)
    if how == "another took the lease":
        lose_lease(gcs)
        assert leader(other_client(server), "head-b").epoch == fence.epoch + 1
    elif how == "the lease expired":
        lose_lease(gcs)
    else:  # the same head took a free lease again: its older fence is stale
        lose_lease(gcs)
        assert leader(gcs, "head-a").epoch == fence.epoch + 1
    listener = other_client(server).redis.pubsub()
    listener.psubscribe("*")
    before = snapshot(gcs)
    with pytest.raises(NotLeaderError) as refused:
        stale_writes(gcs, fence)[write]()
    assert refused.value.fence == fence
    assert snapshot(gcs) == before
    # Nothing was published either: the first message after the refusal is the marker.
    gcs.publish("marker", {})
    message = wait_for(lambda: _next_pmessage(listener), timeout=5)
    assert message["channel"] == gcs.channel("marker").encode()
    listener.close()


def _next_pmessage(pubsub):
    message = pubsub.get_message(timeout=0.1)
    return message if message is not None and message["type"] == "pmessage" else None


def test_the_current_leader_writes_with_its_fence(gcs, server):
    fence = leader(gcs, "head-a")
    populate(gcs, fence)
    lose_lease(gcs)
    new = leader(other_client(server), "head-b")
    for write in stale_writes(other_client(server), new).values():
        write()
    assert gcs.actor("a1") == {"state": "DEAD"}
    assert gcs.placement_group("p1") == {"state": "REMOVED"}
    assert gcs.node("n1")["state"] == "DEAD"


# -- control requests --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, fields, error",
    [
        ("explode", {"actor_id": "a"}, ValueError),
        ("kill_actor", {"actor_id": "a"}, TypeError),  # missing no_restart
        ("kill_actor", {"actor_id": "a", "no_restart": True, "x": 1}, TypeError),
        ("kill_actor", {"actor_id": "a", "no_restart": "yes"}, TypeError),
        ("kill_actor", {"actor_id": 7, "no_restart": True}, TypeError),
        ("create_actor", {"actor_id": ""}, ValueError),
        ("create_pg", {"pg_id": "p", "info": ["not", "an", "object"]}, TypeError),
        ("create_pg", {"pg_id": "p", "info": {"f": object()}}, TypeError),
    ],
)
def test_push_request_checks_its_fields(gcs, kind, fields, error):
    with pytest.raises(error):
        gcs.push_request(kind, **fields)
    with pytest.raises(error):
        gcs.push_requests([("remove_pg", {"pg_id": "ok"}), (kind, fields)])
    assert gcs.redis.keys("*") == []  # nothing queued, not even the valid one


def test_requests_are_taken_in_bursts_in_order_and_kept_until_acked(gcs):
    fence = leader(gcs)
    assert gcs.take_requests(fence, timeout=0) == []
    gcs.push_request("create_actor", actor_id="a1")
    gcs.push_requests(
        [
            ("kill_actor", {"actor_id": "a1", "no_restart": True}),
            ("create_pg", {"pg_id": "p1", "info": {"bundles": [{"CPU": 1}]}}),
            ("remove_pg", {"pg_id": "p1"}),
        ]
    )
    burst = gcs.take_requests(fence, timeout=1, limit=3)
    assert [(r.kind, r.args) for r in burst] == [
        ("create_actor", ("a1",)),
        ("kill_actor", ("a1", True)),
        ("create_pg", ("p1", {"bundles": [{"CPU": 1}]})),
    ]
    assert burst[1].fields == {"actor_id": "a1", "no_restart": True}
    assert gcs.unacked_requests() == burst
    assert gcs.ack_requests(fence, burst[:2]) == 2
    assert gcs.unacked_requests() == burst[2:]
    [last] = gcs.take_requests(fence, timeout=1, limit=1)
    assert (last.kind, last.args) == ("remove_pg", ("p1",))
    assert gcs.ack_requests(fence, [burst[2], last]) == 2
    assert gcs.unacked_requests() == []
    assert gcs.redis.keys("*requests*") == []


def test_take_waits_no_longer_than_the_client_can(server):
    gcs = Gcs(client=fakeredis.FakeRedis(server=server), cluster="c1", socket_timeout=0.4)
    fence = leader(gcs)
    started = time.monotonic()
    assert gcs.take_requests(fence, timeout=60) == []
    assert time.monotonic() - started < 1


def test_requests_survive_a_leader_crash_between_take_and_ack(gcs, server):
    old = leader(gcs, "head-a")
    gcs.push_request("create_actor", actor_id="a1")
    gcs.push_request("remove_pg", pg_id="p1")
    taken = gcs.take_requests(old, timeout=1)
    assert len(taken) == 2
    # head-a dies before acknowledging; its lease expires and head-b takes over.
    lose_lease(gcs)
    successor = other_client(server)
    new = leader(successor, "head-b")
    pending = successor.unacked_requests()
    assert [(r.kind, r.args) for r in pending] == [
        ("create_actor", ("a1",)),
        ("remove_pg", ("p1",)),
    ]
    assert successor.take_requests(new, timeout=0) == []  # nothing new, nothing lost
    with pytest.raises(NotLeaderError):
        gcs.ack_requests(old, taken)  # the old leader, back from a stall, cannot ack them
    assert successor.ack_requests(new, pending) == 2
    assert successor.unacked_requests() == []


def test_a_bad_request_is_typed_and_acked_alone(gcs):
    fence = leader(gcs)
    gcs.push_request("create_actor", actor_id="a1")
    bad_entries = [
        b"not json",
        json.dumps({"kind": "launch_missiles", "fields": {}}).encode(),
        json.dumps({"kind": "kill_actor", "fields": {"actor_id": "a1"}}).encode(),
        json.dumps(["create_actor", "a1"]).encode(),
        pickle.dumps(("create_actor", "a1")),  # never unpickled from Redis
    ]
    gcs.redis.rpush(gcs.key(gcs_schema.REQUESTS), *bad_entries)
    gcs.push_request("remove_pg", pg_id="p1")
    burst = gcs.take_requests(fence, timeout=1)
    assert [type(r) for r in burst] == [Request] + [BadRequest] * 5 + [Request]
    bad = burst[1:-1]
    assert [r.raw for r in bad] == bad_entries
    assert all(r.error for r in bad)
    assert gcs.ack_requests(fence, bad) == 5
    assert gcs.unacked_requests() == [burst[0], burst[-1]]


def test_acking_removes_one_copy_of_identical_requests(gcs):
    fence = leader(gcs)
    gcs.push_request("remove_pg", pg_id="p1")
    gcs.push_request("remove_pg", pg_id="p1")
    first, second = gcs.take_requests(fence, timeout=1)
    assert gcs.ack_requests(fence, [first]) == 1
    assert len(gcs.unacked_requests()) == 1


def test_a_dead_actor_loses_its_spec_and_is_announced(gcs, server):
    fence = leader(gcs)
    pubsub = other_client(server).subscribe(["ch:actor:a1"])
    gcs.create_actor("a1", {"state": "PENDING_CREATION"}, b"spec")
    gcs.update_actor("a1", {"state": "ALIVE", "seq": 1}, fence)
    assert next_message(pubsub) == {"state": "ALIVE", "seq": 1}
    assert gcs.actor_spec("a1") == b"spec"
    gcs.update_actor("a1", {"state": "DEAD", "seq": 2}, fence)
    assert next_message(pubsub) == {"state": "DEAD", "seq": 2}
    assert gcs.actor("a1") == {"state": "DEAD", "seq": 2}
    assert gcs.actor_spec("a1") is None
    assert gcs.redis.zrange(gcs.key(gcs_schema.DEAD_ACTORS), 0, -1) == [b"a1"]
    pubsub.close()


def test_dead_actors_beyond_the_cap_are_dropped_with_their_names(monkeypatch, server):
    monkeypatch.setenv("REDRAY_MAX_DEAD_ACTORS", "2")
    gcs = other_client(server)
    fence = leader(gcs)
    for i in range(4):
        info = {"state": "ALIVE", "name": f"n{i}", "namespace": "ns"}
        gcs.claim_name(NAMED_ACTORS, "ns", f"n{i}", f"a{i}")
        gcs.create_actor(f"a{i}", info, b"spec")
    gcs.update_actor("live", {"state": "ALIVE"}, fence)
    # n0 was released by its owner and bound to a new actor: trimming a0 must not unbind it.
    gcs.release_name(NAMED_ACTORS, "ns", "n0", "a0")
    gcs.claim_name(NAMED_ACTORS, "ns", "n0", "other")
    for i in range(4):
        gcs.update_actor(f"a{i}", {"state": "DEAD", "name": f"n{i}", "namespace": "ns"}, fence)
    assert sorted(gcs.table_all(ACTORS)) == ["a2", "a3", "live"]
    assert sorted(gcs.names(NAMED_ACTORS)) == [
        ("ns", "n0", "other"),
        ("ns", "n2", "a2"),
        ("ns", "n3", "a3"),
    ]
    assert gcs.redis.hlen(gcs.key(gcs_schema.ACTOR_SPECS)) == 0


# -- placement groups -----------------------------------------------------------------------
def test_placement_group_create_and_updates_are_written_and_announced_in_order(gcs, server):
    fence = leader(gcs)
    pubsub = other_client(server).redis.pubsub()
    pubsub.psubscribe(gcs.channel("ch:pg:*"))
    gcs.create_placement_group("p1", {"state": "PENDING", "seq": 0})
    assert gcs.placement_group("p1") == {"state": "PENDING", "seq": 0}
    [request] = gcs.take_requests(fence, timeout=1)
    assert (request.kind, request.args) == ("create_pg", ("p1", {"state": "PENDING", "seq": 0}))
    gcs.update_placement_groups(
        [("p1", {"state": "CREATED", "seq": 1}), ("p1", {"state": "REMOVED", "seq": 2})], fence
    )
    seen = []
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.1)
        if message is not None and message["type"] == "pmessage":
            seen.append(Gcs.decode_message(message)["state"])
    assert seen == ["CREATED", "REMOVED"]
    assert gcs.placement_group("p1") == {"state": "REMOVED", "seq": 2}
    pubsub.close()


def test_a_placement_group_entry_never_exists_without_its_request(gcs):
    with pytest.raises(TypeError):
        gcs.create_placement_group("p1", {"bad": object()})
    assert gcs.redis.keys("*") == []


def test_removed_groups_beyond_the_cap_are_dropped_with_their_names(monkeypatch, server):
    monkeypatch.setenv("REDRAY_MAX_REMOVED_PGS", "2")
    gcs = other_client(server)
    fence = leader(gcs)
    for i in range(5):
        info = {"state": "PENDING", "name": f"g{i}", "namespace": ""}
        gcs.claim_name(NAMED_PGS, "", f"g{i}", f"p{i}")
        gcs.create_placement_group(f"p{i}", info)
    gcs.update_placement_groups(
        [(f"p{i}", {"state": "REMOVED", "name": f"g{i}", "namespace": ""}) for i in range(4)],
        fence,
    )
    assert sorted(gcs.table_all(gcs_schema.PLACEMENT_GROUPS)) == ["p2", "p3", "p4"]
    assert sorted(v for _, _, v in gcs.names(NAMED_PGS)) == ["p2", "p3", "p4"]


def test_round_trip_reads_every_reply_before_raising_an_error(gcs):
    gcs.redis.set("c1:text", "not a number")
    with pytest.raises(Exception, match="not an integer"):
        gcs._round_trip(("INCR", "c1:text"), ("SET", "c1:after", "1"))
    assert gcs._round_trip(("GET", "c1:after"), ("PING",)) == [b"1", b"PONG"]


# -- bounded state ------------------------------------------------------------------------------
CAPS = {"DEAD_ACTORS": 20, "REMOVED_PGS": 20, "FINISHED_JOBS": 20, "DEAD_NODES": 20}


def lifecycles(gcs: Gcs, fence: Fence, count: int, tag: str) -> None:
    """Jobs, actors, placement groups and nodes from birth to end, through the calls a driver,
    a raylet and the control loop make; half the actors are named and detached."""
    for i in range(count):
        job, actor, pg, node = (f"{tag}-{kind}{i}" for kind in ("job", "actor", "pg", "node"))
        gcs.register_node(node, NODE_INFO, ttl=30)
        gcs.add_job(job, {"driver_pid": 1})
        gcs.export_function(f"fn-{job}", b"function body", job_id=job)
        gcs.export_function("shared-fn", b"function body", job_id=job)
        gcs.export_function(f"cls-{job}", b"class body", job_id=job)
        named = i % 2 == 0
        info = {"state": "PENDING_CREATION", "name": actor if named else "", "namespace": "ns"}
        info["detached"] = named
        if named:
            gcs.claim_name(NAMED_ACTORS, "ns", actor, actor)
        gcs.create_actor(actor, info, b"spec", [f"cls-{job}"])
        pg_info = {"state": "PENDING", "name": pg, "namespace": "ns"}
        gcs.claim_name(NAMED_PGS, "ns", pg, pg)
        gcs.create_placement_group(pg, pg_info)
        gcs.ack_requests(fence, gcs.take_requests(fence, timeout=0))
        gcs.update_actor(actor, {**info, "state": "ALIVE"}, fence)
        gcs.update_placement_groups([(pg, {**pg_info, "state": "CREATED"})], fence)
        gcs.heartbeat(node, {"CPU": 1.0}, ttl=30)
        gcs.push_request("kill_actor", actor_id=actor, no_restart=True)
        gcs.push_request("remove_pg", pg_id=pg)
        gcs.ack_requests(fence, gcs.take_requests(fence, timeout=0))
        gcs.finish_job(job)
        gcs.update_actor(actor, {**info, "state": "DEAD"}, fence)
        gcs.update_placement_groups([(pg, {**pg_info, "state": "REMOVED"})], fence)
        gcs.mark_node_dead(node, "stopped", fence)


def check_key_count_returns_to_baseline(gcs: Gcs, count: int) -> None:
    fence = leader(gcs)
    gcs.init_cluster(b"token", {})
    gcs.register_node("head", NODE_INFO, ttl=30)
    lifecycles(gcs, fence, CAPS["DEAD_ACTORS"], "warm")  # the retention tables fill up
    baseline = set(gcs.redis.keys("*"))
    lifecycles(gcs, fence, count, "load")
    assert set(gcs.redis.keys("*")) == baseline
    assert gcs.redis.dbsize() == len(baseline)
    for table, cap in (
        (ACTORS, CAPS["DEAD_ACTORS"]),
        (gcs_schema.PLACEMENT_GROUPS, CAPS["REMOVED_PGS"]),
        (gcs_schema.JOBS, CAPS["FINISHED_JOBS"]),
        (gcs_schema.DEAD_NODES, CAPS["DEAD_NODES"]),
    ):
        assert gcs.redis.hlen(gcs.key(table)) == cap, table
    assert gcs.redis.hlen(gcs.key(NAMED_ACTORS)) <= CAPS["DEAD_ACTORS"]
    assert gcs.redis.hlen(gcs.key(NAMED_PGS)) <= CAPS["REMOVED_PGS"]
    assert [n["node_id"] for n in gcs.live_nodes()] == ["head"]
    # Only the retention structures and cluster-wide keys remain: no per-entity key.
    names = {k.decode().removeprefix(gcs.prefix) for k in baseline}
    assert not any(n.startswith(("fn", "hb:warm", "requests")) for n in names), names


@pytest.fixture
def capped(monkeypatch):
    for name, cap in CAPS.items():
        monkeypatch.setenv(f"REDRAY_MAX_{name}", str(cap))


def test_key_count_returns_to_baseline_after_many_lifecycles(capped, server):
    check_key_count_returns_to_baseline(other_client(server), 200)


# -- named entries ---------------------------------------------------------------------------
def test_claim_lookup_release_names(gcs, server):
    other = other_client(server)
    assert gcs.lookup_name(NAMED_ACTORS, "ns", "counter") is None
    assert gcs.claim_name(NAMED_ACTORS, "ns", "counter", "actor1") == "actor1"
    # The name is taken: a second claim gets the current owner back, not the name.
    assert other.claim_name(NAMED_ACTORS, "ns", "counter", "actor2") == "actor1"
    assert gcs.claim_name(NAMED_ACTORS, "ns", "counter", "actor1") == "actor1"  # idempotent
    assert other.lookup_name(NAMED_ACTORS, "ns", "counter") == "actor1"
    # Names are per namespace.
    assert gcs.claim_name(NAMED_ACTORS, "other", "counter", "actor3") == "actor3"
    # Only the bound value can release the name.
    other.release_name(NAMED_ACTORS, "ns", "counter", "actor2")
    assert gcs.lookup_name(NAMED_ACTORS, "ns", "counter") == "actor1"
    gcs.release_name(NAMED_ACTORS, "ns", "counter", "actor1")
    assert gcs.lookup_name(NAMED_ACTORS, "ns", "counter") is None
    assert other.claim_name(NAMED_ACTORS, "ns", "counter", "actor2") == "actor2"


def test_names_listing(gcs):
    gcs.claim_name(NAMED_ACTORS, "ns1", "a", "id-a")
    gcs.claim_name(NAMED_ACTORS, "ns1", "b", "id-b")
    gcs.claim_name(NAMED_ACTORS, "ns2", "a", "id-c")
    gcs.claim_name(NAMED_PGS, "ns1", "pg", "id-pg")
    assert sorted(gcs.names(NAMED_ACTORS)) == [
        ("ns1", "a", "id-a"),
        ("ns1", "b", "id-b"),
        ("ns2", "a", "id-c"),
    ]
    assert sorted(gcs.names(NAMED_ACTORS, "ns1")) == [("ns1", "a", "id-a"), ("ns1", "b", "id-b")]
    assert gcs.names(NAMED_PGS) == [("ns1", "pg", "id-pg")]
    assert gcs.names(NAMED_ACTORS, "nowhere") == []


# -- generic tables ---------------------------------------------------------------------------
def test_tables(gcs):
    assert gcs.table_get(ACTORS, "a1") is None
    assert gcs.table_all(ACTORS) == {}
    gcs.table_put(ACTORS, "a1", {"state": "PENDING"})
    gcs.table_put(ACTORS, "a2", {"state": "ALIVE"})
    gcs.table_put(ACTORS, "a1", {"state": "ALIVE"})
    assert gcs.table_get(ACTORS, "a1") == {"state": "ALIVE"}
    assert gcs.table_all(ACTORS) == {"a1": {"state": "ALIVE"}, "a2": {"state": "ALIVE"}}
    gcs.table_delete(ACTORS, "a1")
    assert gcs.table_get(ACTORS, "a1") is None
    assert list(gcs.table_all(ACTORS)) == ["a2"]


# -- two clusters, one Redis -------------------------------------------------------------------
def exercise(gcs: Gcs, tag: str) -> None:
    """Use every kind of state a cluster keeps."""
    gcs.init_cluster(tag.encode(), {"tag": tag})
    gcs.register_node(f"node-{tag}", NODE_INFO, ttl=30)
    gcs.heartbeat(f"node-{tag}", {"CPU": 1.0}, ttl=30)
    gcs.add_job(f"job-{tag}", {})
    gcs.next_job_id()
    gcs.export_function("fn", tag.encode())
    gcs.kv_put(b"k", tag.encode())
    gcs.kv_put(b"k", tag.encode(), namespace="ns")
    gcs.table_put(ACTORS, f"actor-{tag}", {"tag": tag})
    fence = leader(gcs, f"leader-{tag}")
    gcs.claim_name(NAMED_ACTORS, "ns", "name", f"actor-{tag}")
    gcs.push_request("remove_pg", pg_id=f"pg-{tag}")
    gcs.take_requests(fence, timeout=0)


def check_isolated(a: Gcs, b: Gcs) -> None:
    exercise(a, "a")
    exercise(b, "b")
    assert a.cluster_token() == b"a" and b.cluster_token() == b"b"
    assert a.cluster_config() == {"tag": "a"}
    assert [n["node_id"] for n in a.nodes()] == ["node-a"]
    assert [n["node_id"] for n in b.nodes()] == ["node-b"]
    assert list(a.jobs()) == ["job-a"]
    assert a.next_job_id() == 2 and b.next_job_id() == 2
    assert a.function("fn") == b"a" and b.function("fn") == b"b"
    assert a.kv_get(b"k") == b"a" and b.kv_get(b"k", namespace="ns") == b"b"
    assert a.kv_keys() == [b"k"]
    assert list(a.table_all(ACTORS)) == ["actor-a"]
    assert a.leader() == "leader-a" and b.leader() == "leader-b"
    assert a.lookup_name(NAMED_ACTORS, "ns", "name") == "actor-a"
    assert b.names(NAMED_ACTORS) == [("ns", "name", "actor-b")]
    assert [r.args for r in a.unacked_requests()] == [("pg-a",)]
    # Every key either cluster wrote lives under its own prefix.
    keys = [k.decode() for k in a.redis.keys("*")]
    assert keys and all(k.startswith((a.prefix, b.prefix)) for k in keys)
    assert a.prefix == f"redray:{a.cluster}:" and a.prefix != b.prefix


def test_two_clusters_share_one_redis(server):
    a = Gcs(client=fakeredis.FakeRedis(server=server), cluster="a")
    b = Gcs(client=fakeredis.FakeRedis(server=server), cluster="b")
    check_isolated(a, b)


def test_two_clusters_pubsub_isolated(server):
    a = Gcs(client=fakeredis.FakeRedis(server=server), cluster="a")
    b = Gcs(client=fakeredis.FakeRedis(server=server), cluster="b")
    sub_a = a.subscribe(["ch:nodes"])
    b.register_node("node-b", NODE_INFO, ttl=30)
    a.register_node("node-a", NODE_INFO, ttl=30)
    assert next_message(sub_a) == {"node_id": "node-a", "state": "ALIVE"}
    sub_a.close()
