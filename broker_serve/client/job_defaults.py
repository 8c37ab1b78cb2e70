"""The deployments' job_config, which a job's submitter needs (its result TTL), read from
their app records and cached per submitter."""

from __future__ import annotations

import time

from ..config import JobConfig
from ..exceptions import RayServeException
from ..state.store import Store

# A deployment's job_config is read from its app record at most this often per submitter.
DEFAULTS_REFRESH_S = 10.0


class JobDefaults:
    """The deployments' job_config, as their app records say, cached per submitter."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._cache: dict[tuple[str, str], tuple[float, JobConfig]] = {}

    async def of(self, app: str, deployment: str) -> JobConfig:
        cached = self._cache.get((app, deployment))
        now = time.monotonic()
        if cached is not None and now - cached[0] < DEFAULTS_REFRESH_S:
            return cached[1]
        record = await self.store.app(app)
        entry = record["deployments"].get(deployment) if record else None
        if entry is None:
            raise RayServeException(f"no deployment {deployment!r} in application {app!r}")
        config = JobConfig.model_validate(entry["config"].get("job_config") or {})
        self._cache[(app, deployment)] = (now, config)
        return config
