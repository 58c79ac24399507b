"""Unit tests of `redray.gcs.Gcs` against fakeredis, plus a round trip on a real redis-server."""

from __future__ import annotations

import pickle
import threading
import time

import fakeredis
import pytest
from conftest import wait_for

from redray.gcs import ACTORS, NAMED_ACTORS, NAMED_PGS, Gcs
from redray.node.redis_server import RedisServer

try:
    import lupa  # noqa: F401 - fakeredis runs Lua scripts (EVALSHA) only with lupa

    HAVE_LUA = True
except ImportError:
    HAVE_LUA = False

needs_lua = pytest.mark.skipif(
    not HAVE_LUA,
    reason="fakeredis runs Lua scripts only with `lupa` (fakeredis[lua]); "
    "the same behaviour is checked against a real redis-server below",
)


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


# -- construction ----------------------------------------------------------------------------
def test_needs_url_or_client():
    with pytest.raises(ValueError):
        Gcs()


def test_ping_and_key_schema(gcs):
    assert gcs.ping() is True
    assert gcs.key("nodes") == "redray:c1:nodes"
    assert gcs.key("hb:{node_id}", node_id="n1") == "redray:c1:hb:n1"
    assert gcs.channel("ch:nodes") == "redray:c1:ch:nodes"


# -- cluster token and config -------------------------------------------------------------
def test_init_cluster_keeps_the_first_token(gcs, server):
    assert gcs.cluster_token() is None
    assert gcs.cluster_config() == {}
    assert gcs.init_cluster(b"first", {"created_by": "n1"}) == b"first"
    # A second head (or a restart) must not replace the token everybody already uses.
    assert other_client(server).init_cluster(b"second", {"created_by": "n2"}) == b"first"
    assert gcs.cluster_token() == b"first"
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


def test_heartbeat_updates_available_resources(gcs):
    gcs.register_node("n1", NODE_INFO, ttl=30)
    gcs.heartbeat("n1", {"CPU": 1.5}, ttl=30, load={"pending": 3})
    [node] = gcs.nodes()
    assert node["available"] == {"CPU": 1.5}
    assert node["load"] == {"pending": 3}


def test_node_without_heartbeat_is_dead(gcs):
    """A node whose heartbeat key expired is reported not alive (failure detection)."""
    gcs.register_node("n1", NODE_INFO, ttl=0.2)
    gcs.register_node("n2", NODE_INFO, ttl=30)
    assert all(n["alive"] for n in gcs.nodes())
    wait_for(
        lambda: {n["node_id"]: n["alive"] for n in gcs.nodes()} == {"n1": False, "n2": True},
        timeout=5,
    )


def test_heartbeats_keep_a_node_alive(gcs):
    gcs.register_node("n1", NODE_INFO, ttl=0.2)
    deadline = time.monotonic() + 0.6  # three TTLs, beating faster than the TTL
    while time.monotonic() < deadline:
        gcs.heartbeat("n1", {"CPU": 4.0}, ttl=0.2)
        assert gcs.nodes()[0]["alive"]
        time.sleep(0.05)


def test_mark_node_dead_once(gcs, server):
    gcs.register_node("n1", NODE_INFO, ttl=30)
    assert gcs.mark_node_dead("n1", "killed") is True
    assert other_client(server).mark_node_dead("n1", "again") is False
    assert gcs.mark_node_dead("missing", "x") is False
    [node] = gcs.nodes()
    assert node["alive"] is False
    assert node["state"] == "DEAD"
    assert node["death_cause"] == "killed"
    assert node["available"] == {}
    # A late heartbeat from a node declared dead does not bring it back.
    gcs.heartbeat("n1", {"CPU": 4.0}, ttl=30)
    assert gcs.nodes()[0]["alive"] is False


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
    gcs.finish_job("01000000")
    job = gcs.jobs()["01000000"]
    assert job["state"] == "FINISHED"
    assert job["end_time"] >= job["start_time"]
    assert job["driver_pid"] == 42


# -- functions -------------------------------------------------------------------------------
def test_function_exported_once(gcs, server):
    assert gcs.function("abc") is None
    gcs.export_function("abc", b"first body")
    # Exports are keyed by content hash: a second export of the key never replaces it.
    other_client(server).export_function("abc", b"other body")
    assert gcs.function("abc") == b"first body"
    assert other_client(server).function("abc") == b"first body"


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


def test_node_state_changes_are_published(gcs, server):
    pubsub = other_client(server).subscribe(["ch:nodes"])
    gcs.register_node("n1", NODE_INFO, ttl=30)
    assert next_message(pubsub) == {"node_id": "n1", "state": "ALIVE"}
    gcs.mark_node_dead("n1", "gone")
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


def test_table_put_publishes_on_channel(gcs, server):
    pubsub = other_client(server).subscribe(["ch:actors"])
    gcs.table_put(ACTORS, "a1", {"state": "ALIVE"}, channel="ch:actors")
    assert next_message(pubsub) == {"id": "a1", "state": "ALIVE"}
    pubsub.close()


# -- control-loop requests and placement-group state ------------------------------------------
@needs_lua
def test_requests_are_taken_in_bursts_in_order(gcs):
    assert gcs.pop_requests(timeout=0.01) == []
    gcs.push_request(b"r1")
    gcs.push_request(b"r2", b"r3", b"r4")
    assert gcs.pop_requests(timeout=1, limit=3) == [b"r1", b"r2", b"r3"]
    assert gcs.pop_requests(timeout=1, limit=1) == [b"r4"]
    assert gcs.pop_requests(timeout=0.01) == []


@needs_lua
def test_placement_group_create_and_updates_are_written_and_announced_in_order(gcs, server):
    pubsub = other_client(server).redis.pubsub()
    pubsub.psubscribe(gcs.channel("ch:pg:*"))
    gcs.create_placement_group("p1", {"state": "PENDING", "seq": 0})
    assert gcs.placement_group("p1") == {"state": "PENDING", "seq": 0}
    assert gcs.pop_requests(timeout=1) == [
        pickle.dumps(("create_pg", "p1", {"state": "PENDING", "seq": 0}))
    ]
    gcs.update_placement_groups(
        [("p1", {"state": "CREATED", "seq": 1}), ("p1", {"state": "REMOVED", "seq": 2})]
    )
    seen = []
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.1)
        if message is not None and message["type"] == "pmessage":
            seen.append(Gcs.decode_message({**message, "type": "message"})["state"])
    assert seen == ["CREATED", "REMOVED"]
    assert gcs.placement_group("p1") == {"state": "REMOVED", "seq": 2}
    pubsub.close()


def test_round_trip_reads_every_reply_before_raising_an_error(gcs):
    gcs.redis.set("c1:text", "not a number")
    with pytest.raises(Exception, match="not an integer"):
        gcs._round_trip(("INCR", "c1:text"), ("SET", "c1:after", "1"))
    assert gcs._round_trip(("GET", "c1:after"), ("PING",)) == [b"1", b"PONG"]


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


# -- leadership lease ------------------------------------------------------------------------
@needs_lua
def test_leadership_take_renew_refuse(gcs, server):
    other = other_client(server)
    assert gcs.leader() is None
    assert gcs.hold_leadership("head-a", ttl=30) is True
    assert gcs.leader() == "head-a"
    assert gcs.hold_leadership("head-a", ttl=30) is True  # renewing
    assert other.hold_leadership("head-b", ttl=30) is False  # a second holder is refused
    assert other.leader() == "head-a"


@needs_lua
def test_leadership_expiry_lets_another_take_it(gcs, server):
    other = other_client(server)
    assert gcs.hold_leadership("head-a", ttl=0.2) is True
    assert other.hold_leadership("head-b", ttl=0.2) is False
    wait_for(lambda: other.hold_leadership("head-b", ttl=30), timeout=5)
    assert gcs.leader() == "head-b"
    assert gcs.hold_leadership("head-a", ttl=30) is False  # the old leader lost it


@needs_lua
def test_renewing_keeps_leadership(gcs, server):
    other = other_client(server)
    gcs.hold_leadership("head-a", ttl=0.2)
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:
        assert gcs.hold_leadership("head-a", ttl=0.2) is True
        assert other.hold_leadership("head-b", ttl=0.2) is False
        time.sleep(0.05)


@needs_lua
def test_release_leadership_only_by_holder(gcs, server):
    other = other_client(server)
    gcs.hold_leadership("head-a", ttl=30)
    other.release_leadership("head-b")  # not the holder: no effect
    assert gcs.leader() == "head-a"
    gcs.release_leadership("head-a")
    assert gcs.leader() is None
    assert other.hold_leadership("head-b", ttl=30) is True


# -- named entries ---------------------------------------------------------------------------
@needs_lua
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


@needs_lua
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


# -- two clusters, one Redis -------------------------------------------------------------------
def exercise(gcs: Gcs, tag: str, lua: bool) -> None:
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
    if lua:
        gcs.hold_leadership(f"leader-{tag}", ttl=30)
        gcs.claim_name(NAMED_ACTORS, "ns", "name", f"actor-{tag}")


def check_isolated(a: Gcs, b: Gcs, lua: bool) -> None:
    exercise(a, "a", lua)
    exercise(b, "b", lua)
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
    if lua:
        assert a.leader() == "leader-a" and b.leader() == "leader-b"
        assert a.lookup_name(NAMED_ACTORS, "ns", "name") == "actor-a"
        assert b.names(NAMED_ACTORS) == [("ns", "name", "actor-b")]
    # Every key either cluster wrote lives under its own prefix.
    keys = [k.decode() for k in a.redis.keys("*")]
    assert keys and all(k.startswith((a.prefix, b.prefix)) for k in keys)
    assert a.prefix == f"redray:{a.cluster}:" and a.prefix != b.prefix


def test_two_clusters_share_one_redis(server):
    a = Gcs(client=fakeredis.FakeRedis(server=server), cluster="a")
    b = Gcs(client=fakeredis.FakeRedis(server=server), cluster="b")
    check_isolated(a, b, lua=HAVE_LUA)


def test_two_clusters_pubsub_isolated(server):
    a = Gcs(client=fakeredis.FakeRedis(server=server), cluster="a")
    b = Gcs(client=fakeredis.FakeRedis(server=server), cluster="b")
    sub_a = a.subscribe(["ch:nodes"])
    b.register_node("node-b", NODE_INFO, ttl=30)
    a.register_node("node-a", NODE_INFO, ttl=30)
    assert next_message(sub_a) == {"node_id": "node-a", "state": "ALIVE"}
    sub_a.close()


# -- a real redis-server -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer.start(
        port=0, password="s3cret/pw", directory=str(tmp_path_factory.mktemp("redis"))
    )
    server.wait_ready()
    yield server
    server.stop()


def test_round_trip_on_real_redis_server(redis_server):
    """The same schema and scripts on a real server, reached by URL with a password."""
    a = Gcs(redis_server.url, "real-a")
    b = Gcs(redis_server.url, "real-b")
    try:
        assert a.ping()
        check_isolated(a, b, lua=True)
        # Lua scripts (leadership, names) behave on the real server as in the unit tests.
        assert b.hold_leadership("intruder", ttl=30) is False
        assert a.claim_name(NAMED_ACTORS, "ns", "name", "someone-else") == "actor-a"
        pubsub = b.subscribe(["ch:test"])
        b.publish("ch:test", {"x": [1, 2]})
        assert next_message(pubsub) == {"x": [1, 2]}
        pubsub.close()
        a.register_node("short", NODE_INFO, ttl=0.2)
        wait_for(
            lambda: not next(n for n in a.nodes() if n["node_id"] == "short")["alive"],
            timeout=5,
        )
    finally:
        a.close()
        b.close()


def test_wrong_password_is_refused(redis_server):
    import redis

    url = redis_server.url.replace("s3cret", "wrong")
    bad = Gcs(url, "x")
    with pytest.raises(redis.exceptions.AuthenticationError):
        bad.ping()
    bad.close()


def test_a_waiting_pop_takes_the_whole_burst_on_real_redis_server(redis_server):
    """The BLPOP blocks; the script pipelined behind it runs once it returns."""
    gcs = Gcs(redis_server.url, "real-requests")
    pusher = Gcs(redis_server.url, "real-requests")
    taken: list[list[bytes]] = []
    try:
        reader = threading.Thread(target=lambda: taken.append(gcs.pop_requests(timeout=10)))
        reader.start()
        wait_for(lambda: gcs.redis.info("clients")["blocked_clients"] >= 1)
        pusher.push_request(b"a", b"b", b"c")
        reader.join(10)
        assert taken == [[b"a", b"b", b"c"]]
    finally:
        gcs.close()
        pusher.close()
