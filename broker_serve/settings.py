"""Process-wide settings read from the environment (`BROKER_SERVE_<FIELD>`).

Every process of a cluster (driver, controller, proxy, worker node, replica) reads the same
variables, so a cluster is fully described by its broker URL, Redis URL and cluster name.
Settings are read when a process needs them, never at import, so a test's (or a parent's)
environment applies.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .tls import ClientTls, ServerTls

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
DEFAULT_MAX_MESSAGE_BYTES = 128 * 1024 * 1024

LOG_FORMATS = ("text", "json")

_CLUSTER_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


def _default_state_dir() -> Path:
    return Path(tempfile.gettempdir()) / "broker-serve"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BROKER_SERVE_", frozen=True, extra="ignore")

    amqp_url: str = DEFAULT_AMQP_URL
    redis_url: str = DEFAULT_REDIS_URL
    cluster: str = DEFAULT_CLUSTER
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # The largest message a replica reads from its queue (docs/architecture.md, "Limits on
    # untrusted input"): above it, it answers 413 unread. RabbitMQ 3.x's own default limit.
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, gt=0)
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
    extra: dict[str, str] = Field(default_factory=dict)

    # How long `serve.run` waits for an application to run, and a config's build may take.
    deploy_timeout_s: float = 300.0
    build_timeout_s: float = 300.0
    # Wins over `http_options.keep_alive_timeout_s`, as Ray's variable does.
    http_keep_alive_timeout_s: float | None = None
    log_format: Literal["text", "json"] = "text"
    # Off turns the per-request log lines off, and with them their cost.
    access_log: bool = True
    # Pids and logs of `broker-serve start`, and the REST API's token file.
    state_dir: Path = Field(default_factory=_default_state_dir)
    # The REST API's bearer token, or several comma-separated while one is rotated (the
    # controller accepts each, clients send the first); unset, the controller generates one
    # into the state dir.
    api_token: str | None = None
    # The cluster secret that signs pickles and specs, from the operator (credentials.py): a
    # file (a mounted Kubernetes or Compose secret) or the value; never stored in Redis.
    cluster_secret_file: Path | None = None
    cluster_secret: SecretStr | None = None
    # The status page at `/` of the REST API's port (docs/architecture.md, "The status page"):
    # true lets anyone who reaches the port view it, without the token.
    status_page_public: bool = False
    # The metrics history in Redis (docs/architecture.md, "Metrics history and `serve.stat`"):
    # how often each proxy and replica writes it (0: never), and how long it is kept while the
    # cluster's own window (`set_history_window`) is unset.
    history_interval_s: float = Field(default=5.0, ge=0, allow_inf_nan=False)
    history_window_s: float = Field(default=3600.0, gt=0, allow_inf_nan=False)
    # The request queues' type where a deployment sets none (docs/architecture.md, "Durable
    # mode"), read where applications are built: quorum queues survive a RabbitMQ node.
    queue_type: Literal["classic", "quorum"] = "classic"
    # Runtime environments (docs/architecture.md, "Runtime environments"): this host's cache of
    # packages and virtual environments (None: `<state_dir>/runtime_env`), the most one package
    # may hold once extracted, and how long an unused cache entry is kept.
    runtime_env_dir: Path | None = None
    runtime_env_max_mb: int = Field(default=512, gt=0)
    runtime_env_cache_ttl_s: float = Field(default=86400.0, gt=0, allow_inf_nan=False)
    # TLS (docs/security.md, "TLS"). TLS_*: how this process checks the servers it connects
    # to (the CA bundle) and proves who it is (a client certificate and key), on every
    # amqps:// and rediss:// connection and HTTPS request. HTTPS_*: the certificate and key the
    # REST API and the HTTP proxies serve HTTPS with; unset, they serve plain HTTP.
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    https_cert_file: Path | None = None
    https_key_file: Path | None = None

    @field_validator("app_dir", "http_keep_alive_timeout_s", "runtime_env_dir",
                     "cluster_secret_file", "cluster_secret", "tls_ca_file", "tls_cert_file",
                     "tls_key_file", "https_cert_file", "https_key_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return value or None

    @field_validator("api_token", mode="before")
    @classmethod
    def _stripped_token(cls, value: Any) -> Any:
        return (value.strip() or None) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _usable_tls_files(self) -> Settings:
        # Here, so that every process fails at start-up, naming the setting.
        self.client_tls().check("BROKER_SERVE_TLS")
        self.server_tls().check("BROKER_SERVE_HTTPS")
        return self

    def client_tls(self) -> ClientTls:
        return ClientTls(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)

    def server_tls(self) -> ServerTls:
        return ServerTls(self.https_cert_file, self.https_key_file)

    def runtime_env_cache(self) -> Path:
        return self.runtime_env_dir or self.state_dir / "runtime_env"

    @field_validator("state_dir", mode="before")
    @classmethod
    def _blank_state_dir(cls, value: Any) -> Any:
        return value or _default_state_dir()

    @field_validator("log_format", mode="before")
    @classmethod
    def _known_log_format(cls, value: Any) -> Any:
        value = str(value).lower()
        if value not in LOG_FORMATS:
            raise ValueError(f"BROKER_SERVE_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, "
                             f"not {value!r}")
        return value

    @field_validator("access_log", mode="before")
    @classmethod
    def _access_log_unless_off(cls, value: Any) -> Any:
        # Any value but these keeps the lines on, as the variable always did.
        return str(value).lower() not in ("0", "false", "no") if isinstance(value, str) else value

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """The environment's settings; overrides that are not None win over it."""
        values: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
        settings = cls(**values)
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
            "BROKER_SERVE_MAX_MESSAGE_BYTES": str(self.max_message_bytes),
            "BROKER_SERVE_LOG_LEVEL": self.log_level,
            "BROKER_SERVE_DASHBOARD_HOST": self.dashboard_host,
            "BROKER_SERVE_DASHBOARD_PORT": str(self.dashboard_port),
            **({"BROKER_SERVE_APP_DIR": self.app_dir} if self.app_dir else {}),
            "BROKER_SERVE_METRICS_HOST": self.metrics_host,
            "BROKER_SERVE_METRICS_PORT": str(self.metrics_port),
            "BROKER_SERVE_HISTORY_INTERVAL_S": str(self.history_interval_s),
            "BROKER_SERVE_HISTORY_WINDOW_S": str(self.history_window_s),
            "BROKER_SERVE_RUNTIME_ENV_DIR": str(self.runtime_env_cache()),
            "BROKER_SERVE_RUNTIME_ENV_MAX_MB": str(self.runtime_env_max_mb),
            "BROKER_SERVE_RUNTIME_ENV_CACHE_TTL_S": str(self.runtime_env_cache_ttl_s),
            **({"BROKER_SERVE_CLUSTER_SECRET_FILE": str(self.cluster_secret_file)}
               if self.cluster_secret_file else {}),
            **{f"BROKER_SERVE_{name.upper()}": str(path) for name, path in (
                ("tls_ca_file", self.tls_ca_file), ("tls_cert_file", self.tls_cert_file),
                ("tls_key_file", self.tls_key_file), ("https_cert_file", self.https_cert_file),
                ("https_key_file", self.https_key_file)) if path is not None},
        }


def state_dir(cluster: str) -> Path:
    """Where this cluster's pids, logs and token file live on this machine."""
    return Settings().state_dir / cluster
