"""Container health checks: `python deploy/healthcheck.py controller | proxy [PORT] | worker`.

Exits 0 when healthy and 1 otherwise, as Docker's HEALTHCHECK expects. The image has it at
/app/deploy/healthcheck.py. It reads the same environment as the process it checks.

- controller: a controller of the cluster holds the lease, so deployments are acted on.
- proxy: the proxy in this container is up and connected to RabbitMQ: `/-/healthz` answers
  200, or 503 "Route table is not populated yet." while no application has a route. This is
  the container's liveness; the load balancer asks `/-/healthz` itself and sends traffic only
  on 200 (readiness). So a proxy of a cluster with no application is healthy here, and nothing
  that waits for a healthy proxy before deploying the application waits forever.
- worker: a worker node of this host is registered and heartbeating.
"""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request

import orjson
import redis

from broker_serve.protocol.names import Names
from broker_serve.proxy.http import NO_ROUTES_MESSAGE
from broker_serve.settings import Settings
from broker_serve.state import connection


def controller(names: Names, client: redis.Redis) -> bool:
    return bool(client.exists(names.controller_lease))


def worker(names: Names, client: redis.Redis) -> bool:
    host = socket.gethostname()
    for node_id, raw in client.hgetall(names.nodes).items():
        if orjson.loads(raw).get("host") == host and client.exists(
            names.node_alive(node_id.decode())
        ):
            return True
    return False


def proxy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/healthz", timeout=3) as answer:
            return bool(answer.status == 200)
    except urllib.error.HTTPError as answer:
        with answer:
            return answer.code == 503 and answer.read(256).decode(errors="replace") == \
                NO_ROUTES_MESSAGE
    except (urllib.error.URLError, OSError):
        return False


def main(argv: list[str]) -> int:
    role = argv[0] if argv else ""
    if role == "proxy":
        return 0 if proxy(int(argv[1]) if len(argv) > 1 else 8000) else 1
    if role not in ("controller", "worker"):
        print(__doc__, file=sys.stderr)
        return 2
    settings = Settings.from_env()
    # A plain URL or a Sentinel one (the compose file's ha profile)
    client = connection.sync_client(settings.redis_url, socket_connect_timeout=3,
                                    socket_timeout=3)
    try:
        check = controller if role == "controller" else worker
        return 0 if check(Names(settings.cluster), client) else 1
    except redis.RedisError as exc:
        print(f"cannot reach Redis at {settings.redis_url}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
