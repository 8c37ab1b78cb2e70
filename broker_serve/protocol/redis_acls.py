"""Redis ACL users per role (docs/security.md, "Redis ACL users"): the rules that let each kind
of process do what broker-serve's code does with Redis, and nothing more.

A role is a kind of process, by what it writes:
- `controller`: the controller (with its REST API), and the drivers and CLI commands that deploy
  or read the cluster (`serve.run`, `broker-serve deploy`, `status`, `stats`...). They own the
  control state: application records, specs, routes, traffic records, HTTP and gRPC options,
  the deploy config, node assignments, queue arguments, the lease;
- `proxy`: a proxy. It reads the routes and what it serves, and writes only proxy records and
  heartbeats, the jobs it submits or cancels, cancellations and its metrics history;
- `worker`: a worker node and the processes it starts (its replicas, which also call other
  deployments through handles, and its node's proxy, which inherits its credentials). It reads
  the specs it runs and its assignments, and writes node and replica records and heartbeats,
  jobs, redelivery counts, cancellations, runtime_env packages and its metrics history.

So a proxy's or worker's credentials cannot change what the cluster runs or where it routes:
they can write none of the control state. Every grant is a `Grant` below, with why the code
needs it. Key patterns are relative to the cluster's prefix `bs:<cluster>:` (names.py), whose
cluster name is escaped for Redis' glob patterns.

A grant of a key the code passes to a Lua script is read-write even where the script only
reads: EVALSHA declares its keys read-write, and Redis checks them so.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .names import Names

ROLES = ("controller", "proxy", "worker")

# The characters Redis' glob patterns (stringmatchlen) give a meaning, escaped with a backslash.
_GLOB_SPECIAL = "\\*?[]"


@dataclass(frozen=True)
class Grant:
    """Keys, channels and commands one part of the code needs, and why (`why`).

    `read` and `write` are key patterns after the cluster's prefix: `write` is read-write (a
    writer of a record reads it too), `read` read-only, and `delete` may only be deleted (a
    selector of its own, whose one command is DEL). `channels` are pub/sub channels after the
    prefix. `commands` are Redis commands (`script|load` for a subcommand), including the
    ones the grant's Lua scripts call: Redis checks those against the caller's user too.
    """

    why: str
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    delete: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    commands: tuple[str, ...] = ()


CONNECTION = Grant(
    why="Every Store pings Redis when it starts, and redis-py pings an idle pub/sub connection "
        "as its health check; a URL naming a database other than 0 makes redis-py SELECT it.",
    commands=("ping", "select"),
)

EVENTS = Grant(
    why="Every long-running process subscribes to the change announcements (`events`), and "
        "announces its own changes there (a node joining, a replica's state).",
    channels=("events",),
    commands=("subscribe", "unsubscribe", "publish"),
)

SCRIPTS = Grant(
    why="Job changes and the metrics history are Lua scripts, run by their SHA and loaded "
        "once into a Redis that does not know them (after a restart).",
    commands=("evalsha", "script|load"),
)

READ_SERVING_STATE = Grant(
    why="What a proxy serves: the HTTP options (`broker-serve proxy` reads them as it "
        "starts), the route table (with each route's traffic split), the application records "
        "(an ingress's deployment, a job's defaults), and the signed gRPC options whose "
        "modules it imports once their signature verifies.",
    read=("http_options", "routes", "apps", "grpc_options"),
    commands=("get", "hget"),
)

READ_RUNNING_STATE = Grant(
    why="What a worker node and its replicas run: the signed specs of their deployments, "
        "and whether Redis holds the state (`seeded`) after a restart, before the node acts "
        "on assignments. (The HTTP options, which say whether the node runs its own proxy, "
        "are a proxy's grant.)",
    read=("spec:*", "seeded"),
    commands=("get", "exists"),
)

PROXY_RECORD = Grant(
    why="A proxy writes its own record in `proxies` and its heartbeat, and deletes both when "
        "it stops. Proxy ids are made at start, so any proxy's heartbeat matches.",
    write=("proxies", "proxy:*:alive"),
    commands=("hset", "hdel", "set", "del"),
)

NODE_RECORD = Grant(
    why="A worker node writes its record in `nodes` and its heartbeat, and deletes them when "
        "it stops (`deregister_node`). It reads the assignments the controller writes for it, "
        "and deletes them as it leaves, but never writes them: which replicas a node runs is "
        "the controller's to say. Its heartbeat and assignments go in one DEL, whose keys "
        "Redis checks against one selector: so the deleting selector has both.",
    write=("nodes", "node:*:alive"),
    read=("node:*:assign",),
    delete=("node:*:alive", "node:*:assign"),
    commands=("hset", "hdel", "hgetall", "set", "del"),
)

REPLICA_RECORDS = Grant(
    why="A replica writes its record and heartbeat; its node marks the record FAILED or DEAD "
        "when the process exits. The merge of both writers is an optimistic transaction "
        "(WATCH, MULTI, EXEC), which redis-py ends with UNWATCH or DISCARD.",
    write=("replicas", "replica:*:alive"),
    commands=("hget", "hset", "set", "del", "watch", "multi", "exec", "discard", "unwatch"),
)

JOBS = Grant(
    why="Jobs (docs/protocol.md, \"Jobs\"): proxies and handles submit them, read their "
        "records, wait for them on `jobs:done` and cancel them; replicas take, retry and end "
        "them. Every change is a script over the record, the counts and the `jobs:done` "
        "channel, which the script names as a key, so that too is granted as a key.",
    write=("job:*", "jobs:counts", "jobs:done"),
    channels=("jobs:done",),
    commands=("hgetall", "hset", "hdel", "hincrby", "expire", "exists", "publish", "subscribe",
              "unsubscribe", *SCRIPTS.commands),
)

CANCELLING = Grant(
    why="A caller that cancels (a client gone, a handle's `cancel`, a job's DELETE) writes "
        "tombstones with their expiry, for replicas that start consuming later.",
    write=("tombstones",),
    commands=("zadd",),
)

TOMBSTONES = Grant(
    why="A replica reads the live tombstones before it consumes, so a request cancelled "
        "while it was away never runs.",
    read=("tombstones",),
    commands=("zrangebyscore",),
)

REDELIVERIES = Grant(
    why="A replica counts a redelivered request's deliveries, and the ones a live replica "
        "released, to tell a request that kills replicas from one given back.",
    write=("deliveries:*",),
    commands=("hincrby", "hget", "expire"),
)

PACKAGES = Grant(
    why="A worker node fetches runtime_env packages by digest, and stores one it downloaded "
        "from its URL back, for other nodes. Packages are content-addressed and checked "
        "against the digest in the signed spec before use, so a wrong one runs nothing.",
    write=("package:*", "packages"),
    commands=("get", "set", "zadd"),
)

HISTORY = Grant(
    why="Proxies and replicas append their metrics to the history stream, trimmed to the "
        "window, in one script (docs/protocol.md, \"Metrics history\").",
    write=("history", "history_meta"),
    commands=("time", "hget", "hset", "exists", "xadd", "pexpire", *SCRIPTS.commands),
)

CONTROL = Grant(
    why="The controller and deploying drivers own the control state, and the controller "
        "copies all of it and writes it back after Redis restarts empty (reseed.py), holds the "
        "lease, prunes packages and tombstones, and deletes an older version's secret.",
    write=("*",),
    channels=("events", "jobs:done"),
    commands=(
        "get", "set", "mget", "del", "exists", "expire", "pexpire", "time",
        "hget", "hmget", "hgetall", "hset", "hdel", "hexists", "hkeys", "hlen", "hincrby",
        "sadd", "srem", "smembers",
        "zadd", "zrem", "zrangebyscore", "zremrangebyscore",
        "lpush", "ltrim", "lrange",
        "xadd", "xtrim", "xrange",
        "watch", "multi", "exec", "discard", "unwatch",
        "publish", "subscribe", "unsubscribe",
        *SCRIPTS.commands,
    ),
)

PROXY_GRANTS = (CONNECTION, EVENTS, READ_SERVING_STATE, PROXY_RECORD, JOBS, CANCELLING, HISTORY)

GRANTS: dict[str, tuple[Grant, ...]] = {
    "controller": (CONNECTION, CONTROL),
    "proxy": PROXY_GRANTS,
    # A worker node starts its node's proxy (proxy location EveryNode, or `--proxy`) with its
    # own environment, so its credentials are a proxy's too.
    "worker": (*PROXY_GRANTS, READ_RUNNING_STATE, NODE_RECORD, REPLICA_RECORDS, TOMBSTONES,
               REDELIVERIES, PACKAGES),
}


def glob_escape(text: str) -> str:
    """`text` as a Redis glob pattern matching exactly itself."""
    return "".join("\\" + char if char in _GLOB_SPECIAL else char for char in text)


def redis_acl_rules(cluster: str, role: str) -> list[str]:
    """The ACL rules of `role`'s user in `cluster`, for `ACL SETUSER <user> >password <rules>`:
    on, its key patterns, its channels and its commands, each reset first, then a selector
    for the keys it may only delete (one rule, in parentheses)."""
    try:
        grants = GRANTS[role]
    except KeyError:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}") from None
    prefix = glob_escape(Names(cluster).key_prefix)
    written = _unique(pattern for grant in grants for pattern in grant.write)
    read = [p for p in _unique(p for grant in grants for p in grant.read) if p not in written]
    channels = _unique(channel for grant in grants for channel in grant.channels)
    commands = _unique(command for grant in grants for command in grant.commands)
    deleted = _unique(pattern for grant in grants for pattern in grant.delete)
    selectors = ([f"({' '.join(f'%W~{prefix}{pattern}' for pattern in deleted)} +del)"]
                 if deleted else [])
    return ["on", "resetkeys", *(f"~{prefix}{pattern}" for pattern in written),
            *(f"%R~{prefix}{pattern}" for pattern in read),
            "resetchannels", *(f"&{prefix}{channel}" for channel in channels),
            "-@all", *(f"+{command}" for command in commands), "clearselectors", *selectors]


def _unique(items: Iterable[str]) -> list[str]:
    """`items` without repeats, in their first order."""
    return list(dict.fromkeys(items))
