"""Placement groups on one node: validation, reservation, scheduling into bundles, removal.

Multi-node placement (STRICT_SPREAD over nodes, pending until a node joins) is covered in
test_multinode.py and test_cluster_faults.py.
"""

from __future__ import annotations

import time

import pytest

import redray
from redray.exceptions import TaskUnschedulableError
from redray.util import (
    get_current_placement_group,
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from redray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


@pytest.fixture(scope="module", autouse=True)
def cluster():
    redray.shutdown()
    redray.init(num_cpus=4, resources={"custom": 10})
    yield
    redray.shutdown()


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.mark.parametrize(
    ("bundles", "message"),
    [
        ([], "cannot contain an empty list"),
        ({"CPU": 1}, "must be list"),
        ([{"CPU": 1}, "CPU"], "list of dictionaries"),
        ([{}], "empty dictionary"),
        ([{"CPU": 0}], "only 0 values"),
        ([{"CPU": -1}], "non-negative"),
    ],
)
def test_bad_bundles_are_rejected_at_the_call(bundles, message):
    with pytest.raises(ValueError, match=message):
        placement_group(bundles)


def test_bad_strategy_and_lifetime_are_rejected():
    with pytest.raises(ValueError, match="Invalid placement group strategy"):
        placement_group([{"CPU": 1}], strategy="PACKED")
    with pytest.raises(ValueError, match="lifetime"):
        placement_group([{"CPU": 1}], lifetime="forever")


def test_ready_wait_and_resources_reserved():
    pg = placement_group([{"CPU": 1}, {"CPU": 1, "custom": 2}], strategy="PACK")
    assert pg.wait(timeout_seconds=10)
    assert redray.get(pg.ready(), timeout=10) == pg
    assert pg.bundle_specs == [{"CPU": 1.0}, {"CPU": 1.0, "custom": 2.0}]
    assert wait_for(lambda: redray.available_resources().get("CPU") == 2.0)
    assert redray.cluster_resources()[f"CPU_group_{pg.id.hex()}"] == 2.0
    remove_placement_group(pg)
    assert wait_for(lambda: redray.available_resources().get("CPU") == 4.0)
    assert wait_for(lambda: placement_group_table(pg)["state"] == "REMOVED")


def test_pending_groups_are_placed_in_order_and_forgotten_once_removed():
    """Groups waiting for room are placed in the order they were created (a younger one
    never takes the room an older one waits for), and creating and removing groups in a loop
    (Ray's benchmark does) does not grow the driver's memory."""
    tracked = redray.core.context.current.placement_groups._states
    groups = [placement_group([{"CPU": 1}]) for _ in range(20)]
    for pg in groups:  # 4 CPUs: the later ones are placed as the earlier ones go, in order
        assert pg.wait(timeout_seconds=10)
        remove_placement_group(pg)
    assert wait_for(lambda: not any(pg.id.hex() in tracked for pg in groups))
    assert placement_group_table(groups[-1])["state"] == "REMOVED"


def test_tasks_and_actors_run_in_their_bundle():
    pg = placement_group([{"CPU": 1}, {"CPU": 1, "custom": 1}])
    assert pg.wait(10)

    @redray.remote(num_cpus=1)
    def inside():
        current = get_current_placement_group()
        return redray.get_runtime_context().get_assigned_resources(), current.id.hex()

    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=1)
    assigned, pg_hex = redray.get(inside.options(scheduling_strategy=strategy).remote())
    assert pg_hex == pg.id.hex()
    assert assigned == {"CPU": 1.0}  # by the names asked for, as Ray shows them

    @redray.remote(num_cpus=1)
    class InBundle:
        def ping(self):
            return "pong"

    actor = InBundle.options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
    ).remote()
    assert redray.get(actor.ping.remote(), timeout=10) == "pong"
    with pytest.raises(ValueError, match="bundle_index"):
        inside.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 5)).remote()
    redray.kill(actor)
    remove_placement_group(pg)


def test_a_bundle_limits_what_runs_in_it_at_once():
    pg = placement_group([{"CPU": 1}])
    assert pg.wait(10)

    @redray.remote(num_cpus=1)
    def stamp():
        started = time.monotonic()
        time.sleep(0.3)
        return started, time.monotonic()

    strategy = PlacementGroupSchedulingStrategy(pg, 0)
    spans = sorted(
        redray.get([stamp.options(scheduling_strategy=strategy).remote() for _ in range(3)])
    )
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end - 0.05  # one CPU in the bundle: they ran one after another
    remove_placement_group(pg)


def test_child_tasks_are_captured_when_asked():
    pg = placement_group([{"CPU": 2}])
    assert pg.wait(10)

    @redray.remote(num_cpus=1)
    def child():
        current = get_current_placement_group()
        return current.id.hex() if current else None

    @redray.remote(num_cpus=1)
    def parent():
        return redray.get(child.remote())

    captured = PlacementGroupSchedulingStrategy(pg, -1, placement_group_capture_child_tasks=True)
    assert redray.get(parent.options(scheduling_strategy=captured).remote()) == pg.id.hex()
    free = PlacementGroupSchedulingStrategy(pg, -1)
    assert redray.get(parent.options(scheduling_strategy=free).remote()) is None
    remove_placement_group(pg)


def test_removal_stops_what_runs_inside_and_fails_what_waits():
    pg = placement_group([{"CPU": 1}])
    assert pg.wait(10)

    @redray.remote(num_cpus=1, max_retries=0)
    def forever():
        time.sleep(60)

    @redray.remote(num_cpus=0)
    class Inside:
        def pid(self):
            import os

            return os.getpid()

    strategy = PlacementGroupSchedulingStrategy(pg, 0)
    running = forever.options(scheduling_strategy=strategy).remote()
    actor = Inside.options(scheduling_strategy=strategy).remote()
    redray.get(actor.pid.remote(), timeout=10)
    time.sleep(0.3)  # let the task start
    remove_placement_group(pg)
    with pytest.raises(redray.exceptions.RayError):
        redray.get(running, timeout=20)
    with pytest.raises(redray.exceptions.RayActorError):
        redray.get(actor.pid.remote(), timeout=20)
    later = forever.options(scheduling_strategy=strategy).remote()
    with pytest.raises(TaskUnschedulableError):
        redray.get(later, timeout=20)


def test_named_group_and_infeasible_group_stays_pending():
    pg = placement_group([{"custom": 1}], name="my-group")
    assert pg.wait(10)
    assert get_placement_group("my-group") == pg
    with pytest.raises(ValueError):
        placement_group([{"custom": 1}], name="my-group")
    remove_placement_group(pg)
    assert wait_for(lambda: _missing("my-group"))

    too_big = placement_group([{"CPU": 100}])
    assert not too_big.wait(timeout_seconds=1)
    assert placement_group_table(too_big)["state"] == "PENDING"
    remove_placement_group(too_big)
    with pytest.raises(redray.exceptions.PlacementGroupSchedulingError):
        redray.get(too_big.ready(), timeout=10)


def _missing(name: str) -> bool:
    try:
        get_placement_group(name)
    except ValueError:
        return True
    return False
