"""Process-wide settings read from the environment.

Every process of a cluster (driver, controller, proxy, worker node, replica) reads the same
variables, so a cluster is fully described by its broker URL, Redis URL and cluster name.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/"
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_CLUSTER = "default"
DEFAULT_DASHBOARD_HOST = "127.0.0.1"
DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_METRICS_HOST = "0.0.0.0"
DEFAULT_METRICS_PORT = 9500

# Bodies travel in chunks of this size (docs/protocol.md, "Chunking").
CHUNK_BYTES = 1024 * 1024
DEFAULT_MAX_BODY_BYTES = 100 * 1024 * 1024

_CLUSTER_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


@dataclass(frozen=True)
class Settings:
    amqp_url: str = DEFAULT_AMQP_URL
    redis_url: str = DEFAULT_REDIS_URL
    cluster: str = DEFAULT_CLUSTER
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    log_level: str = "INFO"
    # The controller's REST API (docs/architecture.md, "Declarative configs and the REST API").
    dashboard_host: str = DEFAULT_DASHBOARD_HOST
    dashboard_port: int = DEFAULT_DASHBOARD_PORT
    # Where a config's import paths are imported from (controller) and replicas run (worker
    # node); None means the process's working directory.
    app_dir: str | None = None
    # Where a worker node serves its replicas' metrics (docs/architecture.md, "Observability");
    # port 0 turns that off.
    metrics_host: str = DEFAULT_METRICS_HOST
    metrics_port: int = DEFAULT_METRICS_PORT
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        env = os.environ
        values: dict[str, object] = {
            "amqp_url": env.get("BROKER_SERVE_AMQP_URL", DEFAULT_AMQP_URL),
            "redis_url": env.get("BROKER_SERVE_REDIS_URL", DEFAULT_REDIS_URL),
            "cluster": env.get("BROKER_SERVE_CLUSTER", DEFAULT_CLUSTER),
            "max_body_bytes": int(env.get("BROKER_SERVE_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES)),
            "log_level": env.get("BROKER_SERVE_LOG_LEVEL", "INFO"),
            "dashboard_host": env.get("BROKER_SERVE_DASHBOARD_HOST", DEFAULT_DASHBOARD_HOST),
            "dashboard_port": int(env.get("BROKER_SERVE_DASHBOARD_PORT",
                                          DEFAULT_DASHBOARD_PORT)),
            "app_dir": env.get("BROKER_SERVE_APP_DIR") or None,
            "metrics_host": env.get("BROKER_SERVE_METRICS_HOST", DEFAULT_METRICS_HOST),
            "metrics_port": int(env.get("BROKER_SERVE_METRICS_PORT", DEFAULT_METRICS_PORT)),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)  # type: ignore[arg-type]
        if not _CLUSTER_NAME.match(settings.cluster):
            raise ValueError(
                f"invalid cluster name {settings.cluster!r}: use 1-64 letters, digits, '_' or '-'"
            )
        return settings

    def env(self) -> dict[str, str]:
        """The variables that hand these settings to a child process."""
        return {
            "BROKER_SERVE_AMQP_URL": self.amqp_url,
            "BROKER_SERVE_REDIS_URL": self.redis_url,
            "BROKER_SERVE_CLUSTER": self.cluster,
            "BROKER_SERVE_MAX_BODY_BYTES": str(self.max_body_bytes),
            "BROKER_SERVE_LOG_LEVEL": self.log_level,
            "BROKER_SERVE_DASHBOARD_HOST": self.dashboard_host,
            "BROKER_SERVE_DASHBOARD_PORT": str(self.dashboard_port),
            **({"BROKER_SERVE_APP_DIR": self.app_dir} if self.app_dir else {}),
            "BROKER_SERVE_METRICS_HOST": self.metrics_host,
            "BROKER_SERVE_METRICS_PORT": str(self.metrics_port),
        }


def state_dir(cluster: str) -> Path:
    base = os.environ.get("BROKER_SERVE_STATE_DIR") or os.path.join(
        tempfile.gettempdir(), "broker-serve"
    )
    return Path(base) / cluster
