"""The route entries of traffic records (docs/architecture.md, "Traffic policy").

Each record with a route prefix becomes the entry at that prefix, over an application's own
entry there. Its `split` lists the named applications that exist, each with its ingress queue;
the weights of the ready ones are renormalised to sum to 1, and the others get 0, so a proxy
never sends a request to an application that cannot take it. Its top-level fields describe
the heaviest ready target (or, with none ready, why not), so readers that know nothing of
splits still work.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..config import is_bounded, is_durable, is_ordered
from ..schema import ApplicationStatus
from ..state.records import (
    AppRecord,
    AppStatusRecord,
    Route,
    ShadowTarget,
    SplitTarget,
    TrafficRecord,
)


def traffic_routes(traffic: Mapping[str, TrafficRecord], apps: Mapping[str, AppRecord],
                   statuses: Mapping[str, AppStatusRecord]) -> dict[str, Route]:
    """The route entry of each traffic record that has a route prefix, by prefix."""
    routes: dict[str, Route] = {}
    for record in traffic.values():
        prefix = record["route_prefix"]
        if prefix is not None:
            routes[prefix] = traffic_route(record, apps, statuses)
    return routes


def traffic_route(record: TrafficRecord, apps: Mapping[str, AppRecord],
                  statuses: Mapping[str, AppStatusRecord]) -> Route:
    split = _split(record, apps, statuses)
    ready = [target for target in split if target["ready"]]
    total = sum(record["split"][target["app"]] for target in ready)
    for target in ready:
        target["weight"] = record["split"][target["app"]] / total
    route: Route = {**_summary(record, split, statuses), "split": split,
                    "endpoint": record["name"], "revision": record["revision"]}
    shadow = _shadow(record, apps, statuses)
    if shadow:
        route["shadow"] = shadow
    if record["methods"] is not None:
        route["methods"] = list(record["methods"])
    return route


def _split(record: TrafficRecord, apps: Mapping[str, AppRecord],
           statuses: Mapping[str, AppStatusRecord]) -> list[SplitTarget]:
    """The split's applications that exist, heaviest first; weights are set by the caller."""
    split: list[SplitTarget] = []
    for app_name in sorted(record["split"], key=lambda a: (-record["split"][a], a)):
        app, status = apps.get(app_name), statuses.get(app_name)
        if app is None or status is None:
            continue  # deleted: left out, the others share its weight
        entry = app["deployments"][app["ingress"]]
        ingress = status["deployments"].get(app["ingress"])
        split.append({
            "app": app_name, "deployment": app["ingress"], "queue": entry["queue"],
            "weight": 0.0, "ready": bool(ingress and ingress["ready"]),
            "bounded": is_bounded(entry["config"]), "durable": is_durable(entry["config"]),
            "ordered": is_ordered(entry["config"]),
        })
    return split


def _shadow(record: TrafficRecord, apps: Mapping[str, AppRecord],
            statuses: Mapping[str, AppStatusRecord]) -> list[ShadowTarget]:
    """The shadows that can take a copy now; the others are left out until they can."""
    shadow: list[ShadowTarget] = []
    for app_name, fraction in sorted(record["shadow"].items()):
        app, status = apps.get(app_name), statuses.get(app_name)
        if app is None or status is None:
            continue
        ingress = status["deployments"].get(app["ingress"])
        if ingress and ingress["ready"]:
            shadow.append({"app": app_name, "deployment": app["ingress"],
                           "queue": app["deployments"][app["ingress"]]["queue"],
                           "fraction": fraction})
    return shadow


def _summary(record: TrafficRecord, split: list[SplitTarget],
             statuses: Mapping[str, AppStatusRecord]) -> Route:
    """The top-level fields: the heaviest ready target's, or with none, why none takes
    requests (the proxy answers 503 with `message`)."""
    name = record["name"]
    top = next((target for target in split if target["ready"]), None)
    if top is not None:
        status = statuses[top["app"]]
        return {"app": top["app"], "deployment": top["deployment"], "queue": top["queue"],
                "status": status["status"], "message": status["message"], "ready": True,
                "bounded": top["bounded"], "durable": top["durable"], "ordered": top["ordered"]}
    if not record["split"]:
        message = f"endpoint {name} has no backend linked"
    elif not split:
        message = (f"endpoint {name}: none of its applications "
                   f"{sorted(record['split'])} exists any more")
    else:
        waiting = [f"{t['app']} is {statuses[t['app']]['status']}" for t in split]
        message = f"endpoint {name} has no ready backend: {', '.join(waiting)}"
    first = split[0] if split else None
    return {"app": first["app"] if first else "", "deployment": first["deployment"] if first
            else "", "queue": first["queue"] if first else "",
            "status": statuses[first["app"]]["status"] if first
            else ApplicationStatus.NOT_STARTED, "message": message, "ready": False,
            "bounded": first["bounded"] if first else False,
            "durable": first["durable"] if first else False,
            "ordered": first["ordered"] if first else False}
