"""Names of queues, exchanges and Redis keys. The layout is documented in docs/architecture.md."""

from __future__ import annotations


class Names:
    """All names of one cluster. Everything a cluster owns starts with its prefix."""

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        self.key_prefix = f"bs:{cluster}:"

    # RabbitMQ
    def request_queue(self, app: str, deployment: str) -> str:
        return f"bs.{self.cluster}.{app}.{deployment}"

    def deployment_exchange(self, app: str, deployment: str) -> str:
        """A fanout exchange bound to the deployment's request queue alone: backend services
        publish through it, so that RabbitMQ's write permission on it grants that deployment
        and no other (docs/security.md, "Per-role RabbitMQ users")."""
        return f"bs.{self.cluster}.to.{app}.{deployment}"

    def reply_queue(self, process_id: str) -> str:
        return f"bs.{self.cluster}.reply.{process_id}"

    def inbox(self, replica_id: str) -> str:
        return f"bs.{self.cluster}.inbox.{replica_id}"

    def affinity_queue(self, replica_id: str) -> str:
        """Requests for models this replica holds (docs/architecture.md, "Model affinity")."""
        return f"bs.{self.cluster}.affinity.{replica_id}"

    def cancel_queue(self, replica_id: str) -> str:
        return f"bs.{self.cluster}.cancels.{replica_id}"

    @property
    def cancel_exchange(self) -> str:
        return f"bs.{self.cluster}.cancel"

    @property
    def dead_letters(self) -> str:
        return f"bs.{self.cluster}.dead"

    # Redis
    def key(self, *parts: str) -> str:
        return self.key_prefix + ":".join(parts)

    @property
    def legacy_secret(self) -> str:
        """Where older versions kept the cluster secret, readable to anyone with Redis access;
        the controller deletes it (docs/architecture.md, "Trust")."""
        return self.key("secret")

    @property
    def queue_arguments(self) -> str:
        """Request queue -> the arguments the controller declared it with."""
        return self.key("queue_arguments")

    def job(self, job_id: str) -> str:
        """Hash: a job's record and result (docs/protocol.md, "The job record")."""
        return self.key("job", job_id)

    @property
    def job_counts(self) -> str:
        """Hash: `<status>|<priority>|<app>|<deployment>` -> jobs; retries and dead letters."""
        return self.key("jobs", "counts")

    @property
    def jobs_done(self) -> str:
        """Pub/sub channel: the id of each job that finished."""
        return self.key("jobs", "done")

    def deliveries(self, correlation_id: str) -> str:
        """A redelivered request's counts: `redelivered`, and `released` by live replicas."""
        return self.key("deliveries", correlation_id)

    @property
    def apps(self) -> str:
        """Hash: app name -> JSON application record (desired config and status)."""
        return self.key("apps")

    @property
    def traffic(self) -> str:
        """Hash: traffic name -> JSON traffic record (weighted split and shadows of a route)."""
        return self.key("traffic")

    def spec(self, app: str, deployment: str, version: str) -> str:
        """Signed pickle of a deployment's definition and init arguments."""
        return self.key("spec", app, deployment, version)

    def package(self, digest: str) -> str:
        """String: a runtime_env package (a zip archive) by its SHA-256."""
        return self.key("package", digest)

    @property
    def packages(self) -> str:
        """Sorted set: package digest -> when it was last stored (unix s), for pruning."""
        return self.key("packages")

    def spec_index(self, app: str) -> str:
        """Set: the spec keys written for an application, so they are found without a SCAN."""
        return self.key("specs", app)

    @property
    def routes(self) -> str:
        """String: JSON route table with a version number."""
        return self.key("routes")

    @property
    def replicas(self) -> str:
        """Hash: replica id -> JSON replica record."""
        return self.key("replicas")

    def replica_alive(self, replica_id: str) -> str:
        return self.key("replica", replica_id, "alive")

    @property
    def nodes(self) -> str:
        """Hash: node id -> JSON node record."""
        return self.key("nodes")

    def node_alive(self, node_id: str) -> str:
        return self.key("node", node_id, "alive")

    def node_assignments(self, node_id: str) -> str:
        """Hash: replica id -> JSON assignment, the replicas a node must run."""
        return self.key("node", node_id, "assign")

    @property
    def proxies(self) -> str:
        """Hash: proxy id -> JSON proxy record (address, loaded route version)."""
        return self.key("proxies")

    def proxy_alive(self, proxy_id: str) -> str:
        return self.key("proxy", proxy_id, "alive")

    @property
    def failures(self) -> str:
        """List: the controller's latest failure records, newest first, capped."""
        return self.key("failures")

    @property
    def tombstones(self) -> str:
        """Sorted set: cancelled request id -> expiry (unix ms)."""
        return self.key("tombstones")

    @property
    def http_options(self) -> str:
        return self.key("http_options")

    @property
    def deploy_config(self) -> str:
        """String: JSON ServeDeploySchema last applied through the REST API."""
        return self.key("deploy_config")

    @property
    def app_builds(self) -> str:
        """Hash: app name -> JSON state of a config application being built or failed to."""
        return self.key("app_builds")

    @property
    def deploy_lock(self) -> str:
        """String with a TTL: held while a config is applied or a deployment scaled."""
        return self.key("deploy_lock")

    @property
    def seeded(self) -> str:
        """Marker: this Redis holds the cluster's state (gone after an empty restart)."""
        return self.key("seeded")

    @property
    def controller_lease(self) -> str:
        return self.key("controller", "lease")

    def controller_alive(self, controller_id: str) -> str:
        """String with a TTL: a controller's heartbeat, its process stamp (`_liveness.py`)."""
        return self.key("controller", controller_id, "alive")

    @property
    def history(self) -> str:
        """Stream: the metrics history, one entry per process and interval (docs/protocol.md,
        "Metrics history")."""
        return self.key("history")

    @property
    def history_meta(self) -> str:
        """Hash: the history's `window_s`, and `since` (unix ms) its stream was started."""
        return self.key("history_meta")

    @property
    def events(self) -> str:
        """Pub/sub channel announcing changes: "apps", "traffic", "routes", "node:<id>"."""
        return self.key("events")
