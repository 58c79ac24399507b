"""How raylets store task attempts in Redis and how the state API reads them back
(redray/state/columns.py, keys.py): calls are recorded by an owner's recorder, shipped
(pickled) and go through a raylet's merge and write into a real redis-server, no cluster, so
each case can set up exactly the order of events it needs."""

from __future__ import annotations

import itertools
import pickle
import time
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redray.core.ids import IdSource
from redray.gcs import Gcs
from redray.node.redis_server import RedisServer
from redray.state import columns, events, keys, tasks

NODE = "ab" * 14
OTHER_NODE = "ef" * 14
WORKER = "cd" * 14
RESOURCES = {"CPU": 1.0}  # (one function's options: the same object in each of its events)
_clusters = itertools.count()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    server = RedisServer.start(port=0, directory=str(tmp_path_factory.mktemp("redis")))
    server.wait_ready()
    yield server.url
    server.stop()


@pytest.fixture
def gcs(redis_url):
    """A cluster of the test's own in the shared redis-server."""
    client = Gcs(redis_url, cluster=f"store{next(_clusters)}")
    yield client
    client.close()


def ended(task_id, attempt=0, name="f", reported=False, running_reported=False, **fields):
    """A call that ended with its worker's reply, as its owner holds it (pushed: wall-clock
    time or None)."""
    now = time.time()
    pushed = fields.get("pushed", now - 0.004)
    actor = fields.get("actor")
    return SimpleNamespace(
        task_id=task_id,
        attempt=attempt,
        created=now - 0.005,
        pushed=pushed - events.WALL_OFFSET if pushed else 0.0,
        run=(now - 0.002, running_reported, fields.get("node", NODE), WORKER, 4242),
        options=SimpleNamespace(name=name, resources=RESOURCES),
        job=SimpleNamespace(job_id="01000000"),
        actor=SimpleNamespace(actor_id=actor) if actor else None,
        parent=fields.get("parent"),
        reported=reported,
    )


def reported(task_id, state="RUNNING", name="f"):
    """A report of work still pending (from its owner) or running (from its worker)."""
    if state == "RUNNING":
        return (events.RUNNING, task_id, 0, time.time(), name, "01000000")
    now = time.time()
    return (events.PENDING, task_id, 0, now, name, "01000000", None, None, RESOURCES, state)


def shipment(recorded) -> tuple[list, list, int]:
    """What an owner's recorder ships of these calls and reports, as its raylet gets it."""
    recorder = events.TaskEventRecorder(lambda *_: None, None, None)
    for item in recorded:
        if type(item) is tuple:
            recorder.add(item)
        else:
            recorder.ended(item, None)
    return pickle.loads(pickle.dumps(recorder.take(), protocol=5))


def store(gcs, recorded, cap=100_000):
    shipped, ended_calls, _ = shipment(recorded)
    batch = events.merge([({"worker_id": WORKER, "pid": 4242}, shipped, ended_calls)], NODE)
    keys.write_task_events(gcs, batch, cap, 100_000)


def state_of(gcs, task_id: bytes) -> str | None:
    found = tasks.get_task(gcs, task_id.hex())
    return found.state if found else None


def test_a_piece_keeps_every_field_of_its_attempts(gcs):
    owner = IdSource()
    parent, plain, actor_call = owner.task_id(), owner.task_id(), owner.task_id()
    actor = bytes(range(16))
    store(
        gcs,
        [
            ended(parent),
            ended(plain, attempt=2, parent=parent, pushed=None, node=OTHER_NODE),
            ended(actor_call, name="A.m", actor=actor),
        ],
    )
    record = tasks.get_task(gcs, plain.hex())
    assert record.state == "FINISHED" and record.attempt_number == 2
    assert record.parent_task_id == parent.hex()
    assert record.node_id == OTHER_NODE and record.worker_id == WORKER
    assert record.worker_pid == 4242 and record.required_resources == {"CPU": 1.0}
    assert record.creation_time_ms <= record.start_time_ms <= record.end_time_ms
    assert [e["state"] for e in record.events][-1] == "FINISHED"
    method = tasks.get_task(gcs, actor_call.hex())
    assert method.type == "ACTOR_TASK" and method.actor_id == actor.hex()
    assert tasks.get_task(gcs, parent.hex()).parent_task_id is None
    # The node index lists each node's attempts only.
    other = tasks.list_tasks(gcs, [("node_id", "=", OTHER_NODE)], limit=10)
    assert [t.task_id for t in other.items] == [plain.hex()]
    assert keys.task_count(gcs) == 3


def test_a_task_is_found_by_id_among_the_pieces_of_many_writes(gcs):
    owner, stranger = IdSource(), IdSource()
    late = owner.task_id()  # runs while 40,000 later tasks of its owner come and go
    written = []
    for _ in range(40):
        ids = [owner.task_id() for _ in range(1000)]
        store(gcs, [ended(t) for t in ids])
        written += ids
    newest = owner.task_id()  # (stored with the late one, in the same write)
    store(gcs, [ended(late, pushed=1.5), ended(newest), ended(stranger.task_id())])
    for task_id in (written[0], written[17_345], written[-1], late, newest):
        assert state_of(gcs, task_id) == "FINISHED", task_id.hex()
    assert tasks.get_task(gcs, late.hex()).events[1]["created_ms"] == 1500
    # Another owner's counter is not this owner's task.
    assert state_of(gcs, stranger.prefix + written[5][8:]) is None
    assert tasks.get_task(gcs, "not-a-task-id") is None


def test_a_report_arriving_after_its_attempt_finished_does_not_revive_it(gcs):
    task_id = IdSource().task_id()
    store(gcs, [reported(task_id, "PENDING_NODE_ASSIGNMENT")])
    assert state_of(gcs, task_id) == "PENDING_NODE_ASSIGNMENT"
    store(gcs, [ended(task_id, reported=True, running_reported=True)])
    # The worker's running report reaches Redis after the end (another raylet's write).
    store(gcs, [reported(task_id, "RUNNING")])
    assert state_of(gcs, task_id) == "FINISHED"
    assert tasks.list_tasks(gcs, [("state", "=", "RUNNING")]).items == []
    assert tasks.list_tasks(gcs, [("state", "=", "PENDING_NODE_ASSIGNMENT")]).items == []
    listed = tasks.list_tasks(gcs, [("name", "=", "f")])
    assert [t.state for t in listed.items] == ["FINISHED"] and listed.num_filtered == 1
    assert keys.task_count(gcs) == 1


def test_reports_shipped_with_their_attempts_end_are_out_of_date(gcs):
    owner = IdSource()
    queued, running = owner.task_id(), owner.task_id()
    # A tick's shipment: the owner's pending report, then the end of the same attempt (it
    # ended between the two); a worker's running report in the same write.
    store(
        gcs,
        [
            reported(queued, "PENDING_NODE_ASSIGNMENT"),
            ended(queued, reported=True),
            reported(running, "RUNNING"),
            ended(running, running_reported=True),
        ],
    )
    assert state_of(gcs, queued) == "FINISHED" and state_of(gcs, running) == "FINISHED"
    for state in ("PENDING_NODE_ASSIGNMENT", "RUNNING"):
        assert tasks.list_tasks(gcs, [("state", "=", state)]).items == []
    assert keys.task_count(gcs) == 2
    assert tasks.list_tasks(gcs, [("name", "=", "f")], limit=1).num_filtered == 2
    assert tasks.list_tasks(gcs, [("job_id", "=", "01000000")], limit=1).num_filtered == 2


def test_records_of_an_older_layout_are_skipped_not_fatal(gcs):
    task_id = IdSource().task_id()
    store(gcs, [ended(task_id)])
    old = IdSource().task_id().hex()
    gcs.redis.hset(gcs.key(keys.DATA), f"{old}:0", '["f","01000000",null]')
    gcs.redis.hset(gcs.key(keys.SEGMENTS), "old", f"name:f\t{old}:0")
    gcs.redis.rpush(keys.index_key(gcs, "all"), "old")
    assert [t.task_id for t in tasks.list_tasks(gcs).items] == [task_id.hex()]
    assert tasks.get_task(gcs, old) is None


def test_retention_drops_the_oldest_attempts_of_a_piece_first(gcs):
    owner = IdSource()
    ids = [owner.task_id() for _ in range(300)]
    for start in range(0, 300, 100):
        store(gcs, [ended(t) for t in ids[start : start + 100]], cap=150)
    assert keys.task_count(gcs) == 150
    assert keys.dropped_counts(gcs)["retention"] == 150
    kept = tasks.list_tasks(gcs, limit=1000)
    assert sorted(t.task_id for t in kept.items) == sorted(t.hex() for t in ids[150:])
    assert state_of(gcs, ids[149]) is None  # dropped from the middle piece
    assert state_of(gcs, ids[150]) == "FINISHED"
    assert tasks.list_tasks(gcs, [("name", "=", "f")], limit=1).num_filtered == 150


@st.composite
def calls(draw):
    owner = IdSource()
    count = draw(st.integers(1, 40))
    times = st.floats(1e9, 2e9, allow_nan=False)
    result = []
    for _ in range(count):
        call = ended(owner.task_id(), attempt=draw(st.integers(0, 300)))
        call.created = draw(times)
        call.run = (
            call.created + draw(st.floats(0, 10)),
            False,
            draw(st.sampled_from([NODE, OTHER_NODE])),
            draw(st.sampled_from([WORKER, "12" * 14, "34" * 14])),
            draw(st.integers(1, 2**22)),
        )
        pushed = draw(st.one_of(st.none(), st.floats(call.created, call.created + 1)))
        call.pushed = pushed - events.WALL_OFFSET if pushed else 0.0
        call.parent = draw(st.one_of(st.none(), st.binary(min_size=14, max_size=14)))
        result.append(call)
    return result


@settings(max_examples=60, deadline=None)
@given(calls(), st.integers(1, 40))
def test_the_columns_give_back_what_the_owner_recorded(recorded, most):
    before = time.time()
    _, (gathered,), _ = shipment(recorded)
    pieces = columns.cut(gathered, most)
    sizes = [min(most, len(recorded) - start) for start in range(0, len(recorded), most)]
    assert [len(p) for p in pieces] == sizes
    records = []
    for piece in pieces:
        ids, body, nodes = columns.encode(piece, None)
        assert set(nodes) == {r["node_id"] for r in columns.decode(ids, body)}
        records += columns.decode(ids, body)
        row = len(piece) // 2
        assert columns.rows_of(ids, piece.task_ids()[row]) == [row]
        assert columns.decode(ids, body, [row]) == [columns.decode(ids, body)[row]]
    assert len(records) == len(recorded)
    for call, record in zip(recorded, records, strict=True):
        assert record["task_id"] == call.task_id.hex()
        assert record["attempt_number"] == call.attempt
        assert record["creation_time_ms"] == int(call.created * 1000)
        pushed = call.pushed + events.WALL_OFFSET if call.pushed else call.created
        assert record["submitted_time_ms"] == int(pushed * 1000)
        assert record["start_time_ms"] == int(call.run[0] * 1000)
        assert (record["node_id"], record["worker_id"]) == call.run[2:4]
        assert record["worker_pid"] == call.run[4]
        assert record.get("parent_task_id") == (call.parent.hex() if call.parent else None)
        assert int(before * 1000) <= record["end_time_ms"] <= time.time() * 1000
