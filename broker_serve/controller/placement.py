"""Placement: which worker node a new replica goes to (docs/architecture.md, "Controller")."""

from __future__ import annotations

from collections.abc import Mapping

from ..state.records import Assignment, NodeRecord

# Resources are floats: a node with exactly what a replica asks for must still fit.
EPSILON = 1e-9


def place(nodes: Mapping[str, NodeRecord], assignments: Mapping[str, Mapping[str, Assignment]],
          app: str, deployment: str, request: Mapping[str, float]) -> tuple[str | None, str]:
    """Among the live nodes with `request` free, the one with the fewest replicas of this
    deployment, then the fewest replicas, then the first by id: spreads a deployment across
    nodes. Or None, and why no node fits."""
    if not nodes:
        return None, "Waiting for a worker node to place replicas on."
    chosen, chosen_rank = None, None
    frees = {}
    for node_id, node in nodes.items():
        assigned = assignments.get(node_id, {})
        free = dict(node.get("resources", {}))
        same = 0
        for assignment in assigned.values():
            for name, amount in (assignment.get("resources") or {}).items():
                free[name] = free.get(name, 0.0) - amount
            same += (assignment["app"], assignment["deployment"]) == (app, deployment)
        frees[node_id] = free
        if all(free.get(name, 0.0) >= amount - EPSILON for name, amount in request.items()):
            rank = (same, len(assigned), node_id)
            if chosen_rank is None or rank < chosen_rank:
                chosen, chosen_rank = node_id, rank
    if chosen is not None:
        return chosen, ""
    free_text = "; ".join(
        f"{node_id}: " + ", ".join(f"{k}={v:g}" for k, v in sorted(free.items()))
        for node_id, free in sorted(frees.items()))
    wanted = ", ".join(f"{k}={v:g}" for k, v in sorted(request.items()))
    return None, (f"Waiting for resources: a replica needs {wanted}, and no live node has "
                  f"that free ({free_text}).")
