"""redis-benchmark: request rates of GET and SET, ``--csv`` command lines and reading."""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from shoal.perf.tools import ToolOutputError

DEFAULT_PORT = 6379


def server_argv(port: int = DEFAULT_PORT) -> list[str]:
    """An in-memory redis on every address: no snapshots, no AOF (the disk is not measured)."""
    return ["redis-server", "--port", str(port), "--bind", "0.0.0.0", "--protected-mode", "no",
            "--save", "", "--appendonly", "no"]


def client_argv(host: str, requests: int, tests: Sequence[str] = ("get", "set"), clients: int = 20,
                pipeline: int = 1, port: int = DEFAULT_PORT) -> list[str]:
    """``pipeline`` 1 is redis-benchmark's default: one request in flight per connection."""
    if requests <= 0 or clients <= 0 or pipeline <= 0:
        raise ValueError("redis-benchmark needs positive requests, clients and pipeline")
    return ["redis-benchmark", "-h", host, "-p", str(port), "-c", str(clients), "-n", str(requests),
            "-P", str(pipeline), "-t", ",".join(tests), "--csv"]


def rates(output: str) -> dict[str, float]:
    """Requests per second per test, keyed by upper-case name ("GET", "SET")."""
    lines = [line for line in output.splitlines() if line.startswith('"')]
    rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
    if not rows or "rps" not in rows[0] or "test" not in rows[0]:
        raise ToolOutputError(f"redis-benchmark: no CSV results in {output.strip()[-300:]!r}")
    try:
        found = {row["test"].upper(): float(row["rps"]) for row in rows}
    except (TypeError, ValueError) as exc:
        raise ToolOutputError(f"redis-benchmark: unreadable rate ({exc})") from exc
    if any(rate <= 0 for rate in found.values()):
        raise ToolOutputError(f"redis-benchmark: a test served no requests: {found}")
    return found
