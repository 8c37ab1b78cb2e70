"""RabbitMQ's log as a test oracle: the channel and connection errors it logged since a mark.

RabbitMQ logs every channel exception ("Channel error on connection <pid> ... operation
basic.ack caused a channel exception precondition_failed: unknown delivery tag 7") and every
connection exception ("Error on AMQP connection <pid> (... - name, ...)"). Such an error is
always a bug of ours: a client that follows the protocol never causes one. Each error is
attributed to its connection's client-provided name, which broker-serve's processes set to
`broker-serve <cluster> <role> <id>`; a test's own clients that mean to cause one name their
connection `test-expects-error ...`.

The tests (`tests/conftest.py`) fail on any error logged during a test, and the benchmark
reports the errors of its run beside its figures.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

EXPECTED_PREFIX = "test-expects-error"
_LINE = re.compile(r"^\S+ \S+ \[(?P<level>\w+)\] <(?P<pid>[\d.]+)> ?(?P<text>.*)$")
_NAME = re.compile(r"^connection <(?P<pid>[\d.]+)> \(.*\) has a client-provided name: (?P<name>.*)$")
_CHANNEL_ERROR = re.compile(r"^Channel error on connection <(?P<conn>[\d.]+)> \((?P<peer>[^,]*),")
_CONNECTION_ERROR = re.compile(
    r"^Error on AMQP connection <(?P<conn>[\d.]+)> \((?P<peer>[^,]*?)(?: - (?P<name>[^,]*))?,")
_HEARTBEAT = re.compile(r"missed heartbeats from client")


@dataclass(frozen=True)
class BrokerError:
    kind: str  # "channel", "connection" or "heartbeat"
    connection: str  # the client-provided name, or the peer address if it gave none
    detail: str

    @property
    def expected(self) -> bool:
        return self.connection.startswith(EXPECTED_PREFIX)

    def __str__(self) -> str:
        return f"{self.kind} error on connection {self.connection!r}: {self.detail}"


def find_log() -> Path | None:
    """The node's main log: $BROKER_SERVE_TEST_RABBITMQ_LOG, or /var/log/rabbitmq/*.log."""
    configured = os.environ.get("BROKER_SERVE_TEST_RABBITMQ_LOG")
    if configured:
        return Path(configured)
    candidates = [p for p in glob.glob("/var/log/rabbitmq/*.log") if "_upgrade" not in p]
    return Path(min(candidates)) if candidates else None


class BrokerLog:
    """Reads the log from where it stood when made (or last read) onward."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = path.stat().st_size
        self._names: dict[str, str] = {}  # connection pid -> client-provided name
        self._pending: dict[str, tuple[str, str]] = {}  # log pid -> (kind, connection)

    def mark(self) -> None:
        self.read()

    def read(self) -> list[BrokerError]:
        """The errors logged since the last read."""
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        # Only whole lines: the rest is read next time.
        end = data.rfind(b"\n") + 1
        self._offset += end
        errors = []
        for raw in data[:end].decode("utf-8", "replace").splitlines():
            error = self._parse(raw)
            if error is not None:
                errors.append(error)
        return errors

    def _parse(self, raw: str) -> BrokerError | None:
        line = _LINE.match(raw)
        if line is None:
            return None
        pid, text = line["pid"], line["text"].strip()
        if (named := _NAME.match(text)) is not None:
            self._names[named["pid"]] = named["name"]
            return None
        if line["level"] not in ("error", "warning"):
            return None
        if (channel := _CHANNEL_ERROR.match(text)) is not None:
            name = self._names.get(channel["conn"], channel["peer"])
            self._pending[pid] = ("channel", name)
            return None
        if (connection := _CONNECTION_ERROR.match(text)) is not None:
            name = connection["name"] or self._names.get(connection["conn"], connection["peer"])
            self._pending[pid] = ("connection", name)
            return None
        if text.startswith("operation ") and pid in self._pending:
            kind, name = self._pending.pop(pid)
            return BrokerError(kind, name, text)
        if _HEARTBEAT.search(text):
            return BrokerError("heartbeat", self._names.get(pid, "?"), text)
        return None
