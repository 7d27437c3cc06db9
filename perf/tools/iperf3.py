"""iperf3 single-stream throughput: ``iperf3 -J`` command lines and JSON reading."""
from __future__ import annotations

import json
from collections.abc import Sequence

from shoal.perf.tools import ToolOutputError

DEFAULT_PORT = 5201


class ServerBusy(ToolOutputError):
    """The iperf3 server was still finishing the previous test (it serves one at a time)."""


def server_argv(port: int = DEFAULT_PORT, bind: str | None = None) -> list[str]:
    argv = ["iperf3", "--server", "--port", str(port)]
    if bind:
        argv += ["--bind", bind]
    return argv


def client_argv(host: str, seconds: float, port: int = DEFAULT_PORT, omit: float = 0.5) -> list[str]:
    """One stream, JSON report; ``omit`` skips TCP slow start from the figure."""
    if seconds <= 0:
        raise ValueError("iperf3 duration must be positive")
    return ["iperf3", "--client", host, "--port", str(port), "--json", "--parallel", "1",
            "--time", f"{seconds:g}", "--omit", f"{omit:g}"]


def received_gbps(report: str | bytes) -> float:
    """Gbit/s the receiver counted over the run (``end.sum_received``)."""
    try:
        doc = json.loads(report)
    except json.JSONDecodeError as exc:
        raise ToolOutputError(f"iperf3: output is not JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise ToolOutputError("iperf3: output is not a JSON object")
    if doc.get("error"):
        error = str(doc["error"])
        raise (ServerBusy if "busy" in error else ToolOutputError)(f"iperf3: {error}")
    try:
        bps = doc["end"]["sum_received"]["bits_per_second"]
    except (KeyError, TypeError) as exc:
        raise ToolOutputError("iperf3: no end.sum_received.bits_per_second in the report") from exc
    if not isinstance(bps, (int, float)) or bps < 0:
        raise ToolOutputError(f"iperf3: bad bits_per_second {bps!r}")
    return bps / 1e9


def summarize(reports: Sequence[str]) -> list[float]:
    return [received_gbps(r) for r in reports]
