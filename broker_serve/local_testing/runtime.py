"""Local testing mode's runtime: the process's handle runtime, with its applications in it.

It is the cluster's `Runtime` (one event loop in a portal's thread, so `.result()` works from
sync code and async methods share the loop, as in a replica), except that calls are published
to the in-process broker, the deployments it knows are its own applications', and nothing
reaches Redis: its store points at a socket that does not exist, so an API that needs the
cluster's state fails at once instead of reading some other cluster's.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any

from anyio.from_thread import BlockingPortal

from ..client.runtime import Delivery, Runtime
from ..config import DeploymentConfig, is_bounded
from ..exceptions import DeployFailed, LocalTestingModeError
from ..protocol import messages
from ..protocol.call_values import loads_signed
from ..settings import Settings
from ..state.records import AppRecord
from ..transport.broker import connection_name
from .broker import LocalBroker
from .replica import LocalReplica

NO_REDIS_URL = "unix:///nonexistent/broker-serve-local-testing-mode.sock"


@dataclass
class LocalApp:
    record: AppRecord
    replicas: dict[str, LocalReplica] = field(default_factory=dict)  # by deployment


class LocalRuntime(Runtime):
    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop,
                 portal: BlockingPortal) -> None:
        settings = settings.model_copy(update={"redis_url": NO_REDIS_URL})
        self.local_broker = LocalBroker(connection_name(settings.cluster, "local", str(os.getpid())))
        super().__init__(settings, loop, portal, self.local_broker)
        self.apps: dict[str, LocalApp] = {}

    async def start(self) -> None:
        self.secret = os.urandom(32)  # pickles are signed and checked, as in a cluster
        self.broker.on_return(self.router.returned)

    async def stop(self) -> None:
        for name in list(self.apps):
            await self.delete(name)
        await self.store.close()

    # what handles ask --------------------------------------------------------------------------
    async def delivery(self, app: str, deployment: str) -> Delivery:
        local = self.apps.get(app)
        replica = local.replicas.get(deployment) if local else None
        bounded = replica is not None and is_bounded(replica.config.model_dump(mode="json"))
        return Delivery(bounded=bounded, durable=False, ordered=False)

    async def ingress_of(self, app: str) -> str:
        local = self.apps.get(app)
        if local is None:
            raise ValueError(f"no application named {app!r}")
        return str(local.record["ingress"])

    def cancel_requests(self, ids: list[str]) -> None:
        self.local_broker.cancel(ids)

    def refuse_unsupported(self, what: str) -> None:
        raise LocalTestingModeError(f"{what} cannot run in local testing mode "
                                    "(serve.run(..., _local_testing_mode=True)); deploy to a "
                                    "cluster for that")

    # deploying ---------------------------------------------------------------------------------
    async def deploy(self, record: AppRecord, specs: dict[str, bytes]) -> None:
        """Start the app's deployments, as a controller would: a deployment whose version is
        running already takes its new live options (user_config goes to `reconfigure()`), any
        other starts a new replica, and the old one stops once the new ones run."""
        name = record["name"]
        old = self.apps.get(name)
        kept: dict[str, LocalReplica] = {}
        starting: dict[str, LocalReplica] = {}
        for deployment, entry in record["deployments"].items():
            config = DeploymentConfig.model_validate(entry["config"])
            running = old.replicas.get(deployment) if old else None
            if running is not None and running.version == entry["version"]:
                kept[deployment] = running
                await self._reconfigure(name, deployment, running, config)
            else:
                starting[deployment] = LocalReplica(name, deployment, entry["version"], config,
                                                    self.secret, self.router.deliver)
        new = LocalApp(record, {**kept, **starting})
        specs_of = {self.names.spec(name, d, e["version"]): d
                    for d, e in record["deployments"].items()}
        definitions = {specs_of[key]: _definition(blob, self.secret)
                       for key, blob in specs.items() if key in specs_of}
        # Every replica is reachable before any constructor runs: constructors may call.
        self.apps[name] = new
        for deployment, replica in starting.items():
            self.local_broker.queues[self.names.request_queue(name, deployment)] = replica
        results = await asyncio.gather(
            *(replica.start(definitions[deployment]) for deployment, replica in starting.items()),
            return_exceptions=True)
        failed = [(d, r) for d, r in zip(starting, results) if isinstance(r, BaseException)]
        if old is not None:
            await self._stop_replaced(old, new)
        if failed:
            await self.delete(name)
            deployment, exc = failed[0]
            raise DeployFailed(f"application {name!r} failed to deploy: deployment "
                               f"{deployment!r}: {type(exc).__name__}: {exc}") from exc

    async def _reconfigure(self, app: str, deployment: str, replica: LocalReplica,
                           config: DeploymentConfig) -> None:
        try:
            await replica.reconfigure(config)
        except Exception as exc:
            raise DeployFailed(f"application {app!r} failed to deploy: deployment "
                               f"{deployment!r}: reconfigure() failed: "
                               f"{type(exc).__name__}: {exc}") from exc

    async def _stop_replaced(self, old: LocalApp, new: LocalApp) -> None:
        replaced = [(d, r) for d, r in old.replicas.items() if new.replicas.get(d) is not r]
        for deployment, replica in replaced:
            queue = self.names.request_queue(old.record["name"], deployment)
            if self.local_broker.queues.get(queue) is replica:  # a deployment the app dropped
                del self.local_broker.queues[queue]
        await _stop_all([replica for _, replica in replaced])

    async def delete(self, name: str) -> None:
        app = self.apps.pop(name, None)
        if app is None:
            return
        for deployment in app.replicas:
            self.local_broker.queues.pop(self.names.request_queue(name, deployment), None)
        await _stop_all(list(app.replicas.values()))


def _definition(spec_blob: bytes, secret: bytes) -> dict[str, Any]:
    """A deployment's definition from its signed spec, as a replica loads it."""
    spec = messages.unpack(spec_blob)
    definition: dict[str, Any] = loads_signed(spec["pickled"], spec["sig"], secret)
    return definition


async def _stop_all(replicas: list[LocalReplica]) -> None:
    await asyncio.gather(*(replica.stop() for replica in replicas))
