"""Each role's RabbitMQ permissions, as patterns over the cluster's names (docs/security.md,
"Per-role RabbitMQ users").

RabbitMQ checks three rights per resource, each a regular expression over exchange and queue
names: *configure* (declare, delete), *write* (publish to an exchange; bind a queue) and
*read* (consume, get, purge a queue; bind from an exchange). A publish through the default
exchange is checked as a write to `amq.default`, whatever queue it goes to: so a role that
publishes requests or replies that way may publish to any queue by name, and a backend
service restricted to named deployments publishes to their deployment exchanges instead
(`Names.deployment_exchange`), each bound to its request queue by the controller.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass

from .names import Names

ROLES = ("controller", "proxy", "worker", "backend")
DEFAULT_EXCHANGE = "amq.default"  # the name RabbitMQ checks a publish to "" against


@dataclass(frozen=True)
class Permissions:
    """One user's rights on one vhost, as `rabbitmqctl set_permissions` takes them."""

    configure: str
    write: str
    read: str

    def rabbitmqctl(self, user: str, vhost: str = "/") -> str:
        """The command that grants them."""
        return shlex.join(["rabbitmqctl", "set_permissions", "-p", vhost, user,
                           self.configure, self.write, self.read])


def rabbitmq_permissions(cluster: str, role: str,
                         deployments: Iterable[tuple[str, str]] = ()) -> Permissions:
    """The rights of `role` in `cluster`; a backend's reach only the `deployments` (app,
    deployment) it is granted.

    - controller: everything of the cluster (it declares and deletes request queues, the
      deployment exchanges and the dead-letter queue, and replays dead letters through the
      default exchange);
    - proxy: its reply queues and the cancel broadcast; it publishes requests through the
      default exchange and cannot consume or declare any other queue;
    - worker (a worker node's replicas, and the handles they call other deployments through):
      consumes request queues, owns its inbox, cancel, affinity and reply queues, publishes
      replies, dead letters and requests through the default exchange; it cannot declare or
      delete request queues nor read the dead letters;
    - backend (a service publishing as docs/protocol.md describes): publishes to the
      deployment exchanges of what it is granted and to the cancel broadcast, and owns its
      reply queues (`bs.<cluster>.reply.<id>`, or server-named); no default exchange, so no
      other queue.

    The cancel exchange is declared by every process that publishes cancels or binds to it
    (it may start before the controller), so those roles may configure it too.
    """
    names = Names(cluster)
    own = _literal(f"bs.{cluster}.")
    cancel = _literal(names.cancel_exchange)
    replies = f"{own}reply\\..+"
    if role == "controller":
        return Permissions(configure=f"^{own}.+$", write=f"^({_literal(DEFAULT_EXCHANGE)}|{own}.+)$",
                           read=f"^{own}.+$")
    if role == "proxy":
        return Permissions(configure=f"^({replies}|{cancel})$",
                           write=f"^({_literal(DEFAULT_EXCHANGE)}|{cancel})$",
                           read=f"^{replies}$")
    if role == "worker":
        private = f"{own}(reply|inbox|cancels|affinity)\\..+"
        return Permissions(configure=f"^({private}|{cancel})$",
                           write=f"^({_literal(DEFAULT_EXCHANGE)}|{cancel}|{own}cancels\\..+)$",
                           read=f"^(?!{_literal(names.dead_letters)}$){own}.+$")
    if role == "backend":
        granted = [_literal(names.deployment_exchange(app, deployment))
                   for app, deployment in sorted(set(deployments))]
        # Or a server-named reply queue (`amq.gen-...`): only its declarer gets that name.
        own_replies = f"({replies}|amq\\.gen-.+)"
        return Permissions(configure=f"^{own_replies}$",
                           write=f"^({'|'.join([*granted, cancel])})$",
                           read=f"^{own_replies}$")
    raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")


def _literal(name: str) -> str:
    """`name` as a regular expression that matches only it (RabbitMQ's are PCRE)."""
    return re.escape(name)
