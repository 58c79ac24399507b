"""Pure scheduling decisions: where a request runs, bundle plans, and bundle accounting."""

from __future__ import annotations

from redray import resources
from redray.node import bundles
from redray.node.scheduling import NodeView, decide, plan_bundles

LOCAL = NodeView("a", ("127.0.0.1", 1), {"CPU": 2.0}, {"CPU": 2.0})
BUSY_LOCAL = NodeView("a", ("127.0.0.1", 1), {"CPU": 2.0}, {"CPU": 0.0})
B = NodeView("b", ("127.0.0.2", 1), {"CPU": 4.0, "gpu_box": 1.0}, {"CPU": 4.0, "gpu_box": 1.0})
C = NodeView("c", ("127.0.0.3", 1), {"CPU": 4.0}, {"CPU": 1.0})
DEAD = NodeView("d", ("127.0.0.4", 1), {"CPU": 8.0}, {"CPU": 8.0}, alive=False)


def test_local_first_then_spill_when_busy():
    assert decide({"CPU": 1}, None, LOCAL, [B, C], False).kind == "local"
    spilled = decide({"CPU": 1}, None, BUSY_LOCAL, [B, C], False)
    assert (spilled.kind, spilled.node.node_id) == ("spill", "b")  # the roomiest
    # A spilled request is never spilled again (no ping-pong).
    assert decide({"CPU": 1}, None, BUSY_LOCAL, [B, C], True).kind == "local"


def test_custom_resource_routes_and_infeasible_waits():
    assert decide({"gpu_box": 1}, None, LOCAL, [B, C], False).node.node_id == "b"
    assert decide({"CPU": 100}, None, LOCAL, [B, C, DEAD], False).kind == "infeasible"


def test_spread_rotates_over_feasible_nodes():
    chosen = [decide({"CPU": 1}, "SPREAD", LOCAL, [B, C], False) for _ in range(6)]
    assert {d.node.node_id if d.node else "a" for d in chosen} == {"a", "b", "c"}


def test_node_affinity_hard_soft_dead_and_unknown():
    def affinity(node_id, soft):
        return {"type": "node_affinity", "node_id": node_id, "soft": soft}

    assert decide({"CPU": 1}, affinity("c", False), LOCAL, [B, C], False).node.node_id == "c"
    assert decide({"CPU": 1}, affinity("d", False), LOCAL, [B, DEAD], False).kind == "error"
    assert decide({"CPU": 1}, affinity("d", True), LOCAL, [B, DEAD], False).kind == "local"
    assert decide({"CPU": 1}, affinity("zz", False), LOCAL, [B], False).kind == "unknown"
    assert decide({"CPU": 1}, affinity("zz", True), LOCAL, [B], False).kind == "local"


NODES = [("a", {"CPU": 2.0}), ("b", {"CPU": 2.0}), ("c", {"CPU": 1.0})]


def test_plans_follow_the_strategy():
    two = [{"CPU": 1.0}, {"CPU": 1.0}]
    assert len(set(plan_bundles(two, "STRICT_PACK", NODES))) == 1
    assert len(set(plan_bundles(two, "PACK", NODES))) == 1
    assert len(set(plan_bundles(two, "SPREAD", NODES))) == 2
    three = [{"CPU": 1.0}] * 3
    assert sorted(plan_bundles(three, "STRICT_SPREAD", NODES)) == ["a", "b", "c"]
    assert plan_bundles([{"CPU": 1.0}] * 4, "STRICT_SPREAD", NODES) is None
    assert plan_bundles([{"CPU": 3.0}], "STRICT_PACK", NODES) is None
    # PACK falls back to several nodes when no single node fits everything.
    packed = plan_bundles([{"CPU": 2.0}, {"CPU": 2.0}], "PACK", NODES)
    assert sorted(packed) == ["a", "b"]


def test_bundles_prepare_commit_remove_restore_resources():
    total = {"CPU": 4.0}
    available = {"CPU": 4.0}
    node = bundles.Bundles(total, available)
    group = [(0, {"CPU": 1.0}), (1, {"CPU": 2.0})]
    assert node.prepare("pg1", group)
    assert available["CPU"] == 1.0
    assert not node.prepare("pg2", [(0, {"CPU": 2.0})])  # does not fit now
    assert node.commit("pg1")
    assert total["CPU_group_pg1"] == 3.0 and available["CPU_group_1_pg1"] == 2.0
    assert total["bundle_group_0_pg1"] == resources.BUNDLE_MARKER_AMOUNT
    node.remove("pg1")
    assert total == {"CPU": 4.0} and available == {"CPU": 4.0}
    assert not node.prepare("pg1", group)  # a removed group never comes back
    assert node.prepare("pg3", group) and node.cancel("pg3") and available == {"CPU": 4.0}


def test_a_node_remembers_a_bounded_number_of_removed_groups(monkeypatch):
    monkeypatch.setattr(bundles, "REMEMBERED_REMOVALS", 3)
    node = bundles.Bundles({"CPU": 4.0}, {"CPU": 4.0})
    for name in ("pg1", "pg2", "pg3", "pg4"):
        node.remove(name)
    assert list(node.removed) == ["pg2", "pg3", "pg4"]  # the oldest is forgotten
    assert not node.prepare("pg2", [(0, {"CPU": 1.0})])  # recent removals still refuse


def test_placement_group_of_resource_names():
    assert resources.placement_group_of("CPU_group_1_abcd") == "abcd"
    assert resources.placement_group_of("CPU_group_abcd") == "abcd"
    assert resources.placement_group_of("CPU") is None
