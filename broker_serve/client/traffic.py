"""Traffic policy from Python: `serve.set_traffic`, `serve.get_traffic`, `serve.delete_traffic`,
and `TrafficHandle`, a handle that routes each call by the same weights (docs/architecture.md,
"Traffic policy").

Ray Serve 0.8's `serve.split`, `serve.link`, `serve.create_endpoint` and `serve.get_handle(
endpoint)` are built on these: an endpoint is a traffic record, its backends are
applications.

A `TrafficHandle` never reads Redis per call. Each process keeps the record of every endpoint
its handles call, with the ingress of each application in it, and reads it again when it is
older than `REFRESH_S` (on the next call), or at once after this process changed it. So a
change made elsewhere reaches a handle within about a second; HTTP requests see it as soon as
`set_traffic` returns.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import weakref
from collections.abc import Mapping
from typing import Any

from ..exceptions import BrokerServeError, RayServeException
from ..state.records import RouteTableRecord, TrafficRecord
from ..state.traffic import WeightedChoice, make_traffic, public_view, write_traffic
from .api import PROXY_ROUTES_TIMEOUT_S, wait_for_proxies
from .handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator, _Call
from .runtime import Runtime, current_runtime, get_runtime

log = logging.getLogger("broker_serve")

REFRESH_S = 1.0
_TIMEOUT_S = PROXY_ROUTES_TIMEOUT_S + 30.0  # Redis calls and the proxies' wait


# the records ----------------------------------------------------------------------------------
def set_traffic(route_prefix: str | None, split: Mapping[str, float], *,
                shadow: Mapping[str, float] | None = None, name: str | None = None,
                methods: list[str] | None = None) -> None:
    """Route `route_prefix` (None: handles only) to applications by weight.

    `split` maps application names to weights that sum to 1; `{}` makes an endpoint with no
    backend yet, whose route answers 503. `shadow` maps application names to the fraction of
    requests copied to them, whose responses are dropped. `name` (default: the route prefix)
    is the record's name, which `TrafficHandle` and `delete_traffic` take. `methods` limits
    the HTTP methods the route takes (others get 405); None takes any.

    Applies to the next request, without a restart: returns once every live proxy loaded
    it. Raises ValueError if the record is invalid, names an application that does not
    exist, or takes a route prefix that another record or an application outside the split
    has.
    """
    if name is None:
        if route_prefix is None:
            raise ValueError("set_traffic needs a name when route_prefix is None")
        name = route_prefix
    record = make_traffic(name, route_prefix, split, shadow, methods)
    runtime = current_runtime() or get_runtime()
    runtime.run_sync(_set(runtime, record), _TIMEOUT_S)


async def _set(runtime: Runtime, record: TrafficRecord) -> None:
    previous = await runtime.store.traffic_record(record["name"])
    await write_traffic(runtime.store, record)
    _forget(runtime, record["name"])
    if record["route_prefix"] is not None or (previous and previous["route_prefix"]):
        await _wait_applied(runtime, record["name"], record["route_prefix"], record["revision"])


def get_traffic(name: str) -> dict[str, Any] | None:
    """The traffic record `name` (`name`, `route_prefix`, `methods`, `split`, `shadow`), or
    None."""
    runtime = current_runtime() or get_runtime()
    record = runtime.run_sync(runtime.store.traffic_record(name), _TIMEOUT_S)
    return public_view(record) if record is not None else None


def delete_traffic(name: str) -> None:
    """Delete the traffic record `name`; its route is gone once this returns. The
    applications it named keep running. Deleting a record that does not exist does nothing."""
    runtime = current_runtime() or get_runtime()
    runtime.run_sync(_delete(runtime, name), _TIMEOUT_S)


async def _delete(runtime: Runtime, name: str) -> None:
    store = runtime.store
    previous = await store.traffic_record(name)
    if previous is None:
        return
    await store.delete_traffic(name)
    await store.announce("traffic")
    _forget(runtime, name)
    if previous["route_prefix"] is not None:
        await _wait_applied(runtime, name, None, None)


async def _wait_applied(runtime: Runtime, name: str, prefix: str | None,
                        revision: str | None) -> None:
    """Wait until every live proxy routes `prefix` by this revision of the record, and no
    other prefix by any (a record that moved, or was deleted)."""
    def applied(table: RouteTableRecord) -> bool:
        for other_prefix, route in table["routes"].items():
            if route.get("endpoint") == name and (other_prefix != prefix
                                                  or route.get("revision") != revision):
                return False
        if prefix is None:
            return True
        entry = table["routes"].get(prefix)
        return entry is not None and entry.get("revision") == revision

    await wait_for_proxies(runtime, applied, f"traffic {name!r}")


# the handle -----------------------------------------------------------------------------------
class TrafficHandle:
    """Calls the applications of traffic record `name`, each call to one chosen by weight,
    through a `DeploymentHandle` of that application's ingress. `.options()` takes what
    `DeploymentHandle.options()` takes; `.remote()` returns what it returns."""

    def __init__(self, name: str, *, _options: DeploymentHandle | None = None) -> None:
        self.name = name
        # Holds the call options; its app is replaced by the chosen one at each call.
        self._options = _options or DeploymentHandle(None, name)

    def options(self, **options: Any) -> TrafficHandle:
        return TrafficHandle(self.name, _options=self._options.options(**options))

    def __getattr__(self, name: str) -> TrafficHandle:
        if name.startswith("_"):
            raise AttributeError(name)
        return self.options(method_name=name)

    def remote(self, *args: Any, **kwargs: Any) -> DeploymentResponse | DeploymentResponseGenerator:
        runtime = current_runtime() or get_runtime()
        call = _TrafficCall(runtime, self._options, args, kwargs, _endpoint(runtime, self.name))
        if self._options.stream:
            return DeploymentResponseGenerator(call)
        return DeploymentResponse(call)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_handle, (self.name, self._options))

    def __repr__(self) -> str:
        return f"TrafficHandle(name={self.name!r})"


def _rebuild_handle(name: str, options: DeploymentHandle) -> TrafficHandle:
    return TrafficHandle(name, _options=options)


class _TrafficCall(_Call):
    """A handle call whose application is drawn by weight when it starts: where a plain
    call looks up its app's ingress, this one chooses the app and takes its ingress."""

    def __init__(self, runtime: Runtime, options: DeploymentHandle, args: tuple[Any, ...],
                 kwargs: dict[str, Any], endpoint: _Endpoint) -> None:
        self.endpoint = endpoint  # before the call's task starts, in another thread maybe
        super().__init__(runtime, options, args, kwargs)

    async def _ingress(self) -> str:
        app, ingress = await self.endpoint.choose(self.runtime)
        chosen = copy.copy(self.handle)  # the same options, for that application
        chosen.app_name, chosen.deployment_name = app, ingress
        self.handle = chosen
        return ingress


class _Endpoint:
    """What this process knows of one traffic record: its applications with their ingress
    and weights, read at most every REFRESH_S."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.read_at = -1e9
        self.targets: list[tuple[tuple[str, str], float]] = []  # ((app, ingress), weight)
        self.apps: WeightedChoice[tuple[str, str]] = WeightedChoice([])
        self.missing = ""  # why no application can be chosen, if none can
        self._lock = asyncio.Lock()

    async def choose(self, runtime: Runtime) -> tuple[str, str]:
        """An application by weight, and its ingress. Runs on the runtime's loop."""
        if runtime.loop.time() - self.read_at >= REFRESH_S:
            async with self._lock:  # concurrent calls share one read
                if runtime.loop.time() - self.read_at >= REFRESH_S:
                    await self._read(runtime)
        if not self.apps:
            raise RayServeException(self.missing, deployment=self.name)
        return self.apps.choose()

    async def _read(self, runtime: Runtime) -> None:
        store = runtime.store
        try:
            record = await store.traffic_record(self.name)
            apps = {app: await store.app(app) for app in (record["split"] if record else {})}
        except BrokerServeError as exc:
            if not self.apps:
                raise
            # The data plane goes on while Redis is away: keep what was read last.
            log.warning("could not read traffic %r (%s); using what was read before",
                        self.name, exc)
            self.read_at = runtime.loop.time()
            return
        targets: list[tuple[tuple[str, str], float]] = []
        if record is None:
            self.missing = f"there is no traffic endpoint named {self.name!r}"
        elif not record["split"]:
            self.missing = f"endpoint {self.name} has no backend linked"
        else:
            # Applications deleted since the record was written are left out; the others
            # share their weight, as on the HTTP route.
            targets = [((app, app_record["ingress"]), weight)
                       for app, weight in record["split"].items()
                       if (app_record := apps.get(app)) is not None]
            self.missing = (f"endpoint {self.name}: none of its applications "
                            f"{sorted(record['split'])} exists any more")
        if targets != self.targets:  # an unchanged split keeps its sequence of draws
            self.targets, self.apps = targets, WeightedChoice(targets)
        self.read_at = runtime.loop.time()


_endpoints: weakref.WeakKeyDictionary[Runtime, dict[str, _Endpoint]] = \
    weakref.WeakKeyDictionary()


def _endpoint(runtime: Runtime, name: str) -> _Endpoint:
    endpoints = _endpoints.setdefault(runtime, {})
    endpoint = endpoints.get(name)
    if endpoint is None:
        endpoint = endpoints[name] = _Endpoint(name)
    return endpoint


def _forget(runtime: Runtime, name: str) -> None:
    """This process changed the record: its handles read it again on their next call."""
    endpoint = _endpoints.get(runtime, {}).get(name)
    if endpoint is not None:
        endpoint.read_at = -1e9
