"""The Celery front end (redray/celery/) running a small, unmodified Celery project
(tests/celery_proj.py) on a real cluster: tasks, bind/retry, autoretry with backoff,
routing, chain, group, chord, beat, AsyncResult; and what is refused."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path

import pytest
from conftest import wait_for
from dq_cluster import QueueCluster

from redray.celery import AsyncResult, chain, chord, group
from redray.celery import exceptions as celery_exceptions
from redray.celery.schedules import crontab
from redray.durable import beat as beatmod


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    cluster = QueueCluster(tmp_path_factory.mktemp("celery-redis"))
    import celery_proj

    workers = celery_proj.app.start_worker(
        queues=["celery", "emails"], concurrency=2, heartbeat_ttl=1.0
    )
    yield celery_proj
    workers.stop()
    cluster.shutdown()


@pytest.mark.timeout(60)
def test_tasks_delay_apply_async_routes_and_results(proj):
    result = proj.add.delay(2, 3)
    assert result.get(timeout=20) == 5
    assert result.state == "SUCCESS" and result.ready() and result.successful()
    assert AsyncResult(result.id).get(timeout=1) == 5  # by id, on the default app
    later = proj.mul.apply_async((6, 7), countdown=0.2, priority=0)
    assert later.get(timeout=20) == 42
    email = proj.send_email.delay("a@example.com")
    assert email.get(timeout=20) == "sent to a@example.com"
    assert proj.app.client.info(email.id)["queue"] == "emails"  # task_routes
    assert proj.double.delay(21).get(timeout=20) == 42  # shared_task
    assert proj.via_redray.delay(9).get(timeout=20) == 81  # a task calling a redray task
    assert proj.app.send_task("celery_proj.add", (1, 1)).get(timeout=20) == 2


@pytest.mark.timeout(60)
def test_bound_tasks_retry_and_autoretry_gives_up(proj):
    result = proj.flaky.delay(2)
    task_id, retries = result.get(timeout=20)
    assert task_id == result.id and retries == 2
    failing = proj.always_oserror.delay()
    with pytest.raises(OSError, match="disk on fire"):
        failing.get(timeout=20)
    assert failing.state == "FAILURE" and failing.failed()
    assert "disk on fire" in failing.traceback
    assert failing.retries == 2
    beyond = proj.flaky.delay(10)  # max_retries=3: the 4th retry raises the exception
    with pytest.raises(ConnectionError, match="try again"):
        beyond.get(timeout=20)


@pytest.mark.timeout(60)
def test_chain_group_and_chord(proj):
    assert chain(proj.add.s(2, 2), proj.mul.s(4), proj.mul.s(10))().get(timeout=20) == 160
    assert (proj.add.s(1, 1) | proj.mul.s(3)).delay().get(timeout=20) == 6
    assert (proj.add.si(1, 1) | proj.add.si(5, 5))().get(timeout=20) == 10  # immutable
    assert group(proj.add.s(i, i) for i in range(5))().get(timeout=20) == [0, 2, 4, 6, 8]
    assert chord(proj.add.s(i, i) for i in range(5))(proj.tsum.s()).get(timeout=20) == 20
    # a group in a chain becomes a chord
    assert (
        chain(proj.add.s(1, 2), group(proj.mul.s(2), proj.mul.s(3)), proj.tsum.s())().get(
            timeout=20
        )
        == 15
    )


@pytest.mark.timeout(60)
def test_a_revoked_task_never_runs(proj):
    result = proj.add.apply_async((1, 2), countdown=0.3)
    result.revoke()
    assert result.state == "REVOKED"
    with pytest.raises(celery_exceptions.TaskRevokedError):
        result.get(timeout=5)
    with pytest.raises(NotImplementedError, match="terminate"):
        result.revoke(terminate=True)


@pytest.mark.timeout(60)
def test_beat_fires_each_due_time_once_across_a_failover(proj, tmp_path, monkeypatch):
    ticks = tmp_path / "ticks"
    entry = proj.app.conf.beat_schedule["tick-every-half-second"]
    monkeypatch.setitem(entry, "args", (str(ticks),))
    first = proj.app.start_beat(tick=0.05, lease_ttl=0.6)
    second = proj.app.start_beat(tick=0.05, lease_ttl=0.6)  # a standby (a second -B worker)
    try:
        wait_for(lambda: len(lines(ticks)) >= 2, timeout=20)
        leader = first if first.epoch else second
        standby = second if leader is first else first
        leader.stop(release=False)  # as if it died: its lease lapses
        wait_for(lambda: standby.epoch > 0, timeout=10)
        count = len(lines(ticks))
        wait_for(lambda: len(lines(ticks)) >= count + 2, timeout=20)
    finally:
        first.stop()
        second.stop()
    fired = lines(ticks)
    assert max(Counter(fired).values()) == 1, fired  # no due time fired twice
    dues = sorted(int(job_id.rsplit("-", 1)[1]) for job_id in fired)
    assert all(b - a >= 500 for a, b in zip(dues, dues[1:], strict=False)), dues


def lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def test_crontab_schedules_follow_celery_fields():
    utc = dt.timezone.utc
    every_15 = crontab(minute="*/15")
    at = dt.datetime(2024, 1, 1, 10, 7, tzinfo=utc)
    assert every_15.next_after(at) == dt.datetime(2024, 1, 1, 10, 15, tzinfo=utc)
    monday_7_30 = crontab(hour=7, minute=30, day_of_week="mon")
    assert monday_7_30.next_after(at) == dt.datetime(2024, 1, 8, 7, 30, tzinfo=utc)
    first_of_month = crontab(minute=0, hour=0, day_of_month=1)
    assert first_of_month.next_after(at) == dt.datetime(2024, 2, 1, 0, 0, tzinfo=utc)
    due = every_15.latest_due(int(at.timestamp() * 1000), int(at.timestamp() * 1000) + 3600_000)
    assert due == int(dt.datetime(2024, 1, 1, 11, 0, tzinfo=utc).timestamp() * 1000)
    with pytest.raises(ValueError):
        crontab(minute="61")
    assert beatmod.as_schedule(dt.timedelta(seconds=2)).ms == 2000


def test_unsupported_options_raise_clear_errors(proj):
    with pytest.raises(NotImplementedError, match="link"):
        proj.add.apply_async((1, 2), link=proj.add.s(1))
    with pytest.raises(TypeError, match="unknown apply_async options"):
        proj.add.apply_async((1, 2), bogus=1)
    with pytest.raises(TypeError, match="add"):
        proj.add.delay(1, 2, 3)
    with pytest.raises(TypeError, match="unknown task options"):
        proj.app.task(frobnicate=True)(lambda: None)
    with pytest.raises(NotImplementedError, match="group directly followed by a group"):
        chain(group(proj.add.s(1, 1)), group(proj.add.s(2, 2)))()
