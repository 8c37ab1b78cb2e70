"""The RabbitMQ nodes a process may connect to (docs/architecture.md, "The AMQP transport").

`BROKER_SERVE_AMQP_URL` names one node or several, separated by commas: full URLs
(`amqp://u:p@h1:5672/,amqp://u:p@h2:5672/`), or one URL with several hosts, which share its
scheme, credentials, virtual host and query (`amqp://u:p@h1:5672,h2:5672,h3/vhost`).
"""

from __future__ import annotations

import re

_COMPACT = re.compile(r"^(?P<scheme>[A-Za-z][\w+.-]*)://(?:(?P<userinfo>[^@/]*)@)?"
                      r"(?P<hosts>[^/?#]*)(?P<rest>.*)$")


def parse(setting: str) -> list[str]:
    """One URL per node, in the order given."""
    parts = [part.strip() for part in setting.split(",") if part.strip()]
    if not parts:
        raise ValueError("BROKER_SERVE_AMQP_URL names no RabbitMQ node")
    if all("://" in part for part in parts):
        return parts
    compact = _COMPACT.match(setting.strip())
    if compact is None or any("://" in part for part in parts[1:]):
        raise ValueError("BROKER_SERVE_AMQP_URL must be comma-separated amqp:// URLs, or one "
                         f"amqp:// URL with comma-separated hosts; got {setting!r}")
    userinfo = f"{compact['userinfo']}@" if compact["userinfo"] is not None else ""
    return [f"{compact['scheme']}://{userinfo}{host.strip()}{compact['rest']}"
            for host in compact["hosts"].split(",") if host.strip()]
