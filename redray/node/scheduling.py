"""Where a lease request should run: pure decisions over resource dicts and the cluster view.

The raylet that receives a request runs it locally when the request fits here, and otherwise
answers "try node X" (spillback) with the node chosen here. Strategies follow Ray: DEFAULT
prefers the local node, SPREAD rotates over nodes that fit, node affinity pins a node (softly
or strictly).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

EPSILON = 1e-9


@dataclass(frozen=True)
class NodeView:
    """One node as the scheduler sees it (from heartbeats)."""

    node_id: str
    raylet_address: tuple[str, int]
    total: dict[str, float]
    available: dict[str, float]
    alive: bool = True


def fits(request: dict[str, float], capacity: dict[str, float]) -> bool:
    return all(capacity.get(name, 0.0) + EPSILON >= amount for name, amount in request.items())


def missing(request: dict[str, float], capacity: dict[str, float]) -> dict[str, float]:
    """The parts of a request that exceed capacity."""
    return {
        name: amount
        for name, amount in request.items()
        if capacity.get(name, 0.0) + EPSILON < amount
    }


def normalize(resources: dict[str, Any]) -> dict[str, float]:
    """Drop zero amounts; amounts as floats."""
    return {name: float(amount) for name, amount in resources.items() if amount}


_spread_counter = itertools.count()


@dataclass(frozen=True)
class Decision:
    """Run locally, spill to another node, wait (infeasible now), or fail."""

    kind: str  # "local" | "spill" | "infeasible" | "unknown" | "error"
    node: NodeView | None = None
    message: str = ""


def decide(
    request: dict[str, float],
    strategy: Any,
    local: NodeView,
    others: list[NodeView],
    spilled: bool,
) -> Decision:
    """Choose where a request runs."""
    alive = [n for n in others if n.alive and n.node_id != local.node_id]
    if isinstance(strategy, dict) and strategy.get("type") == "node_affinity":
        known = {n.node_id for n in others} | {local.node_id}
        if strategy["node_id"] not in known:
            if strategy.get("soft"):
                return decide(request, "DEFAULT", local, others, spilled)
            return Decision("unknown")  # not heard of yet (a new node?): wait for the view
        return _node_affinity(request, strategy, local, alive)
    if strategy == "SPREAD" and not spilled:
        candidates = [n for n in [local, *alive] if fits(request, n.total)]
        if not candidates:
            return Decision("infeasible")
        # Round-robin over every node that could run it (busy ones queue it), as Ray does.
        candidates.sort(key=lambda n: n.node_id)
        choice = candidates[next(_spread_counter) % len(candidates)]
        return Decision("local") if choice is local else Decision("spill", choice)
    if fits(request, local.total):
        if spilled or fits(request, local.available):
            return Decision("local")
        elsewhere = [n for n in alive if fits(request, n.available)]
        if elsewhere:
            return Decision("spill", _least_loaded(elsewhere, request))
        return Decision("local")
    if spilled:
        return Decision("infeasible")
    elsewhere = [n for n in alive if fits(request, n.total)]
    if not elsewhere:
        return Decision("infeasible")
    ready = [n for n in elsewhere if fits(request, n.available)]
    return Decision("spill", _least_loaded(ready or elsewhere, request))


def _least_loaded(nodes: list[NodeView], request: dict[str, float]) -> NodeView:
    def headroom(node: NodeView) -> float:
        return min(
            (node.available.get(k, 0.0) / node.total[k] for k in request if node.total.get(k)),
            default=1.0,
        )

    return max(nodes, key=lambda n: (headroom(n), n.node_id))


def _node_affinity(
    request: dict[str, float], strategy: dict, local: NodeView, alive: list[NodeView]
) -> Decision:
    target_id, soft = strategy["node_id"], strategy.get("soft", False)
    if target_id == local.node_id:
        if fits(request, local.total):
            return Decision("local")
        if not soft:
            return Decision("infeasible")
        target = None
    else:
        target = next((n for n in alive if n.node_id == target_id), None)
        if target is not None and fits(request, target.total):
            return Decision("spill", target)
    if not soft:
        return Decision(
            "error",
            message=f"The node specified by NodeAffinitySchedulingStrategy ({target_id}) "
            "does not exist or is dead, and soft=False.",
        )
    fallback = dict(strategy)
    del fallback["type"]
    return decide(request, "DEFAULT", local, alive, spilled=False)


def plan_bundles(
    bundles: list[dict[str, float]], strategy: str, nodes: list[tuple[str, dict[str, float]]]
) -> list[str] | None:
    """A node for each bundle under a placement strategy, or None if it cannot be placed now.

    nodes: (node_id, available resources) of live nodes. Every plan respects what each node
    has free, counting bundles already planned on it.
    """
    if not nodes:
        return None
    order = sorted(range(len(bundles)), key=lambda i: -sum(bundles[i].values()))
    free = {node_id: dict(available) for node_id, available in nodes}
    roomiest = sorted(free, key=lambda n: -sum(free[n].values()))

    def take(node_id: str, bundle: dict[str, float]) -> None:
        for name, amount in bundle.items():
            free[node_id][name] = free[node_id].get(name, 0.0) - amount

    if strategy in ("PACK", "STRICT_PACK"):
        total: dict[str, float] = {}
        for bundle in bundles:
            for name, amount in bundle.items():
                total[name] = total.get(name, 0.0) + amount
        for node_id in roomiest:
            if fits(total, free[node_id]):
                return [node_id] * len(bundles)
        if strategy == "STRICT_PACK":
            return None
    plan: list[str | None] = [None] * len(bundles)
    used: dict[str, int] = {n: 0 for n in free}
    for index in order:
        bundle = bundles[index]
        candidates = [n for n in roomiest if fits(bundle, free[n])]
        if strategy == "STRICT_SPREAD":
            candidates = [n for n in candidates if not used[n]]
        if not candidates:
            return None
        if strategy == "PACK":
            choice = max(candidates, key=lambda n: used[n])  # fill nodes already in use
        else:
            choice = min(candidates, key=lambda n: used[n])  # spread out
        take(choice, bundle)
        used[choice] += 1
        plan[index] = choice
    return plan  # type: ignore[return-value]


def without_groups(resources: dict[str, float]) -> dict[str, float]:
    """The resources that belong to no placement group (a node's view holds every committed
    group's resources too, and planning bundles needs only the plain ones)."""
    return {name: amount for name, amount in resources.items() if "_group_" not in name}
