"""Which node a new replica goes to (broker_serve/controller/placement.py)."""

from __future__ import annotations

from typing import Any

from broker_serve.controller.placement import place


def node(cpus: float, **resources: float) -> Any:
    return {"node_id": "n", "host": "h", "pid": 1, "started": 0.0, "metrics_port": None,
            "resources": {"CPU": cpus, **resources}}


def assignment(app: str, deployment: str, cpus: float = 1.0) -> Any:
    return {"app": app, "deployment": deployment, "version": "v",
            "graceful_shutdown_timeout_s": 20.0, "resources": {"CPU": cpus}}


def test_no_node_says_so():
    assert place({}, {}, "a", "d", {"CPU": 1}) == (
        None, "Waiting for a worker node to place replicas on.")


def test_a_deployment_spreads_across_nodes_before_stacking():
    nodes = {"n1": node(4), "n2": node(4)}
    assignments = {"n1": {"r1": assignment("a", "d")}, "n2": {"r2": assignment("a", "other"),
                                                               "r3": assignment("a", "other")}}
    # n2 runs more replicas, but none of this deployment: it wins
    assert place(nodes, assignments, "a", "d", {"CPU": 1}) == ("n2", "")


def test_ties_go_to_the_emptier_node_then_the_first_by_id():
    nodes = {"n2": node(4), "n1": node(4), "n3": node(4)}
    assignments = {"n3": {"r": assignment("a", "other")}}
    assert place(nodes, assignments, "a", "d", {"CPU": 1}) == ("n1", "")


def test_a_node_fits_exactly_what_is_left():
    nodes = {"n1": node(1.0)}
    assignments = {"n1": {"r": assignment("a", "d", cpus=0.7)}}
    assert place(nodes, assignments, "a", "d", {"CPU": 0.3})[0] == "n1"


def test_no_room_anywhere_names_what_is_free():
    nodes = {"n1": node(2, GPU=0), "n2": node(1)}
    assignments = {"n1": {"r": assignment("a", "d", cpus=2)}}
    chosen, why = place(nodes, assignments, "a", "d", {"CPU": 1, "GPU": 1})
    assert chosen is None
    assert why == ("Waiting for resources: a replica needs CPU=1, GPU=1, and no live node has "
                   "that free (n1: CPU=0, GPU=0; n2: CPU=1).")
