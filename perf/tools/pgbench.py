"""pgbench select-only (``-S``): transactions per second over TCP."""
from __future__ import annotations

import re

from shoal.perf.tools import ToolOutputError

DEFAULT_PORT = 5432
_TPS = re.compile(r"^tps = (\d+(?:\.\d+)?) \((?:without|excluding) initial connection", re.MULTILINE)
_FAILED = re.compile(r"number of failed transactions: (\d+)")


def init_argv(host: str, port: int = DEFAULT_PORT, scale: int = 1) -> list[str]:
    return ["pgbench", "-i", "-q", "-s", str(scale), "-h", host, "-p", str(port), "-U", "postgres", "postgres"]


def select_argv(host: str, seconds: float, clients: int = 8, port: int = DEFAULT_PORT) -> list[str]:
    """Select-only, ``clients`` connections over two threads, no vacuum (the client may not own it)."""
    if seconds < 1 or int(seconds) != seconds:
        raise ValueError("pgbench takes a whole number of seconds, at least 1")
    return ["pgbench", "-S", "-n", "-c", str(clients), "-j", str(min(2, clients)), "-T", str(int(seconds)),
            "-h", host, "-p", str(port), "-U", "postgres", "postgres"]


def tps(output: str) -> float:
    """Transactions per second, without the connection setup time; failed runs raise."""
    failed = _FAILED.search(output)
    if failed and int(failed.group(1)):
        raise ToolOutputError(f"pgbench: {failed.group(1)} failed transactions")
    match = _TPS.search(output)
    if not match:
        raise ToolOutputError(f"pgbench: no tps line in {output.strip()[-300:]!r}")
    value = float(match.group(1))
    if value <= 0:
        raise ToolOutputError("pgbench: zero transactions per second")
    return value
