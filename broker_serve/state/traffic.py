"""Traffic records: making one from its parts, writing it with the checks against the
applications and the other records, and choosing by its weights (docs/architecture.md,
"Traffic policy").

`serve.set_traffic` and the REST API write through `write_traffic`, so a record is checked
the same way whoever writes it; the proxy and `TrafficHandle` choose with `WeightedChoice`.
"""

from __future__ import annotations

import random
import secrets
from bisect import bisect_right
from collections.abc import Collection, Mapping, Sequence
from typing import Generic, Literal, TypeVar

from ..schema import check_route_prefix, check_traffic
from .records import AppRecord, TrafficRecord
from .store import Store

T = TypeVar("T")
_GOLDEN = (5 ** 0.5 - 1) / 2


def make_traffic(name: str, route_prefix: str | None, split: Mapping[str, float],
                 shadow: Mapping[str, float] | None = None, methods: list[str] | None = None,
                 source: Literal["declarative"] | None = None) -> TrafficRecord:
    """A checked record (ValueError says what is wrong), with a new revision."""
    check_route_prefix(route_prefix)
    shadow = {} if shadow is None else shadow
    methods = check_traffic(name, split, shadow, methods)
    record: TrafficRecord = {
        "name": name, "route_prefix": route_prefix, "methods": methods,
        "split": {app: float(weight) for app, weight in split.items()},
        "shadow": {app: float(fraction) for app, fraction in shadow.items()},
        "revision": secrets.token_hex(8),
    }
    if source is not None:
        record["source"] = source
    return record


async def write_traffic(store: Store, record: TrafficRecord,
                        replacing: Collection[str] = ()) -> None:
    """Check `record` against the cluster and write it. The applications it names must exist;
    its route prefix must not be another record's (other than those in `replacing`, being
    rewritten alongside), nor served by an application outside its split. Raises ValueError.

    An application deleted later stays in the record: the controller leaves it out of the
    route (docs/architecture.md, "Traffic policy").
    """
    apps = await store.apps()
    check_against(record, apps, await store.traffic(), replacing)
    await store.put_traffic(record)
    await store.announce("traffic")


def check_against(record: TrafficRecord, apps: Mapping[str, AppRecord],
                  others: Mapping[str, TrafficRecord], replacing: Collection[str] = ()) -> None:
    """The checks of `write_traffic`, on state already read."""
    name, prefix = record["name"], record["route_prefix"]
    unknown = sorted((set(record["split"]) | set(record["shadow"])) - set(apps))
    if unknown:
        raise ValueError(f"traffic {name!r} names application(s) {unknown}, which do not "
                         "exist; deploy them first (route_prefix=None keeps them off HTTP)")
    if prefix is None:
        return
    for other in others.values():
        if other["name"] != name and other["name"] not in replacing \
                and other["route_prefix"] == prefix:
            raise ValueError(f"route_prefix {prefix!r} is already routed by traffic "
                             f"{other['name']!r}")
    owners = sorted(app_name for app_name, app in apps.items()
                    if app.get("route_prefix") == prefix and app_name not in record["split"])
    if owners:
        raise ValueError(f"route_prefix {prefix!r} is served by application(s) {owners}, "
                         "which are not in the split; add them to it or move them first")


def public_view(record: TrafficRecord) -> dict[str, object]:
    """What `serve.get_traffic` and the REST API's GET show of a record."""
    return {"name": record["name"], "route_prefix": record["route_prefix"],
            "methods": record["methods"], "split": dict(record["split"]),
            "shadow": dict(record["shadow"])}


class WeightedChoice(Generic[T]):
    """Chooses among items by weight, in memory: a bisect over the cumulative weights.

    The draws are a golden-ratio sequence from a random start (u, u + 0.618..., ... mod 1),
    not independent random numbers: any run of n choices, and any evenly spaced subsequence of
    them, is within about log(n)/n of the weights, where independent draws stray by about
    1/sqrt(n). So a 90/10 canary gets 10% of a few hundred requests, not 7% or 13%.
    """

    __slots__ = ("_draw", "cumulative", "items")

    def __init__(self, weighted: Sequence[tuple[T, float]]) -> None:
        self.items = [item for item, weight in weighted if weight > 0]
        self.cumulative: list[float] = []
        total = 0.0
        for _, weight in weighted:
            if weight > 0:
                total += weight
                self.cumulative.append(total)
        self._draw = random.random()

    def __bool__(self) -> bool:
        return bool(self.items)

    def choose(self) -> T:
        """The next item; the choice must not be empty."""
        draw, self._draw = self._draw, (self._draw + _GOLDEN) % 1.0
        index = bisect_right(self.cumulative, draw * self.cumulative[-1])
        return self.items[min(index, len(self.items) - 1)]
