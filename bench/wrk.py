"""Running wrk against 127.0.0.1 and parsing what it prints."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field

WRK_INSTALL = "apt-get install -y wrk"

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


class WrkMissing(RuntimeError):
    pass


class WrkFailed(RuntimeError):
    pass


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise WrkMissing(f"wrk is not installed (not on PATH): install it with `{WRK_INSTALL}`")
    return path


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    non_2xx: int
    socket_errors: dict[str, int]
    latency_ms: dict[str, float] = field(default_factory=dict)  # "50" -> ms
    command: list[str] = field(default_factory=list)

    @property
    def errors(self) -> int:
        """Non-2xx/3xx responses plus every kind of socket error."""
        return self.non_2xx + sum(self.socket_errors.values())

    def error_counts(self) -> dict[str, int]:
        """Each kind apart (bench/errors.py). wrk counts a `timeout` when an answer arrives
        after --timeout: a request still unanswered when the run ends is in none of these."""
        return {"non_2xx": self.non_2xx, **self.socket_errors}

    def details(self) -> dict[str, object]:
        return {
            "requests": self.requests, "seconds": self.seconds, "non_2xx": self.non_2xx,
            "socket_errors": self.socket_errors, "latency_ms": self.latency_ms,
            "command": " ".join(self.command),
        }


def run_wrk(url: str, *, threads: int, connections: int, duration_s: float,
            latency: bool = False, timeout_s: float = 5.0) -> WrkResult:
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"wrk only targets 127.0.0.1 here, not {url!r}")
    command = [wrk_path(), f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
               f"--timeout={max(1, round(timeout_s))}s"]
    if latency:
        command.append("--latency")
    command.append(url)
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              timeout=duration_s + timeout_s + 30)
    except subprocess.TimeoutExpired as exc:
        raise WrkFailed(f"wrk did not finish in time: {' '.join(command)}") from exc
    if done.returncode != 0:
        raise WrkFailed(f"wrk exited {done.returncode}: {done.stderr.strip() or done.stdout}")
    result = parse_wrk(done.stdout)
    result.command = command
    return result


def parse_wrk(text: str) -> WrkResult:
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if total is None or rps is None:
        raise WrkFailed(f"cannot parse wrk output:\n{text}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    socket = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    socket_errors = dict(zip(("connect", "read", "write", "timeout"),
                             (int(g) for g in socket.groups()) if socket else (0, 0, 0, 0)))
    latency: dict[str, float] = {}
    distribution = text.split("Latency Distribution", 1)
    if len(distribution) == 2:
        for pct, number, unit in re.findall(r"^\s*([\d.]+)%\s+([\d.]+)(us|ms|s|m|h)\s*$",
                                             distribution[1], flags=re.MULTILINE):
            latency[pct.rstrip("0").rstrip(".") if "." in pct else pct] = (
                float(number) * _UNITS_MS[unit]
            )
    return WrkResult(
        requests=int(total.group(1)),
        seconds=float(total.group(2)) * _UNITS_MS[total.group(3)] / 1000.0,
        rps=float(rps.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=socket_errors,
        latency_ms=latency,
    )
