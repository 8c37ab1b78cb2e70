"""Desired applications: writing one, and the version that covers everything a deploy changes."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Collection

import orjson

from .records import AppRecord, DeploymentEntry
from .store import Store


def app_version(route_prefix: str | None, deployments: dict[str, DeploymentEntry]) -> str:
    # The app's version covers the live options too, so serve.run waits until they apply.
    return hashlib.sha256(orjson.dumps([route_prefix, sorted(
        (d, v["version"], v["config"]) for d, v in deployments.items())])).hexdigest()[:16]


async def write_app(store: Store, record: AppRecord, specs: dict[str, bytes],
                    replacing: Collection[str] = ()) -> None:
    """Make an application desired: its specs and its record, in one transaction. `serve.run`
    and a config's PUT both deploy through here. `replacing` names applications being
    rewritten alongside, whose route prefixes do not count as taken.

    Each write gives the record a new `deploy_id`, which the controller's status echoes and
    whose replicas alone count towards its start failures.
    """
    name, prefix = record["name"], record["route_prefix"]
    for other, app in (await store.apps()).items():
        if other != name and other not in replacing and prefix is not None \
                and app.get("route_prefix") == prefix:
            raise ValueError(f"route_prefix {prefix!r} is already used by application {other!r}")
    if prefix is not None:
        for traffic in (await store.traffic()).values():
            # A config's own records are rewritten with it (controller/declarative.py).
            mine = replacing and traffic.get("source") == "declarative"
            if traffic["route_prefix"] == prefix and name not in traffic["split"] and not mine:
                raise ValueError(
                    f"route_prefix {prefix!r} is routed by traffic {traffic['name']!r}, whose "
                    f"split does not name application {name!r}: add it to the split, or "
                    "deploy it with another route_prefix (or None)")
    record["deploy_id"] = secrets.token_hex(8)
    await store.put_app(record, specs)
    await store.announce("apps")
