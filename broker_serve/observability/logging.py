"""Log setup shared by every broker-serve process: one line per record, tagged with the process.

`BROKER_SERVE_LOG_FORMAT=json` (or `--log-format json`) makes every line a JSON object instead
of text. Child processes inherit the variable, so a worker's replicas follow their node.

The per-request lines of the proxy and the replicas (`AccessLog`, logger
`broker_serve.access`) are buffered and written in batches, because the `logging` machinery
costs several microseconds per record, a few percent of a no-op request.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import orjson

from ..settings import Settings

ACCESS_LOGGER = "broker_serve.access"

_output: _Output | None = None


class _Output:
    """Where and how this process writes its lines, as `setup_logging` chose."""

    def __init__(self, component: str, log_format: str, stream: TextIO) -> None:
        self.component = component
        self.json = log_format == "json"
        self.stream = stream
        self._second = self._millis = -1
        self._prefix = self._stamp = ""

    def timestamp(self, when: float) -> str:
        """`2024-05-01 12:00:00,123` (text, local time, as logging's asctime) or
        `2024-05-01T10:00:00.123Z` (JSON, UTC). Lines of one millisecond share the string, and
        the second's part is formatted once a second."""
        millis = int(when * 1000)
        if millis == self._millis:
            return self._stamp
        second, rest = divmod(millis, 1000)
        if second != self._second:
            self._second = second
            self._prefix = (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)) if self.json
                            else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)))
        self._millis = millis
        self._stamp = f"{self._prefix}.{rest:03d}Z" if self.json else f"{self._prefix},{rest:03d}"
        return self._stamp


class _JsonFormatter(logging.Formatter):
    def __init__(self, output: _Output) -> None:
        super().__init__()
        self.output = output

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.output.timestamp(record.created), "level": record.levelname,
            "process": self.output.component, "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def setup_logging(level: str, component: str, log_format: str | None = None) -> None:
    global _output
    settings = Settings()
    _output = _Output(component, log_format or settings.log_format, sys.stderr)
    handler = logging.StreamHandler(sys.stderr)
    if _output.json:
        handler.setFormatter(_JsonFormatter(_output))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s {component} %(name)s - %(message)s"
        ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # BROKER_SERVE_ACCESS_LOG=0 turns the per-request lines off, and with them their cost.
    logging.getLogger(ACCESS_LOGGER).setLevel(
        logging.NOTSET if settings.access_log else logging.WARNING)
    # aio-pika logs every reconnect attempt at length; our own reconnect warnings are enough.
    logging.getLogger("aio_pika").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("aiormq").setLevel(max(logging.WARNING, root.level))


Line = tuple[Any, ...]


class AccessLog:
    """One INFO line per request (logger `broker_serve.access`), written in batches.

    `add` only appends the request's values to a list; within `FLUSH_S` (or every
    `MAX_PENDING` lines) they are formatted, by `text` into the line's message and by `fields`
    into the JSON line's keys, and written in one write. In a process whose logging
    `setup_logging` did not set up, the lines go through `logging` instead.
    """

    # Small batches: formatting costs about 1 us a line, and while it runs the event loop
    # serves nobody, so a large batch would show in the latency's tail.
    FLUSH_S = 0.05
    MAX_PENDING = 64

    def __init__(self, text: Callable[[Line], str],
                 fields: Callable[[Line], dict[str, Any]]) -> None:
        self._text = text
        self._fields = fields
        self._logger = logging.getLogger(ACCESS_LOGGER)
        # Read once: the level is set up before the proxy or replica that makes this starts.
        self.enabled = self._logger.isEnabledFor(logging.INFO)
        self._pending: list[tuple[float, Line]] = []
        self._timer: asyncio.TimerHandle | None = None

    def add(self, values: Line) -> None:
        pending = self._pending
        pending.append((time.time(), values))
        if len(pending) == 1:
            self._timer = asyncio.get_running_loop().call_later(self.FLUSH_S, self.flush)
        elif len(pending) >= self.MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        if not pending:
            return
        output, text = _output, self._text
        if output is None:
            for _, values in pending:
                self._logger.info(text(values))
            return
        if output.json:
            fields = self._fields
            lines = [orjson.dumps({
                "time": output.timestamp(when), "level": "INFO", "process": output.component,
                "logger": ACCESS_LOGGER, "message": text(values), **fields(values)}).decode()
                for when, values in pending]
        else:
            prefix = f" INFO {output.component} {ACCESS_LOGGER} - "
            lines = [output.timestamp(when) + prefix + text(values) for when, values in pending]
        try:
            output.stream.write("\n".join(lines) + "\n")
            output.stream.flush()
        except (OSError, ValueError):  # stderr closed: nothing else to tell
            pass
