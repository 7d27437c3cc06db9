"""sockperf ping-pong at a fixed message rate: round-trip percentiles over one TCP connection."""
from __future__ import annotations

import re

from shoal.perf.tools import ToolOutputError

DEFAULT_PORT = 11111

_PERCENTILE = re.compile(r"percentile\s+(\d+(?:\.\d+)?)\s*=\s*(\d+(?:\.\d+)?)")
_OBSERVATIONS = re.compile(r"Total\s+(\d+)\s+observations")
_DROPPED = re.compile(r"# dropped messages = (\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def server_argv(bind: str, port: int = DEFAULT_PORT) -> list[str]:
    return ["sockperf", "server", "--tcp", "--ip", bind, "--port", str(port)]


def client_argv(host: str, seconds: float, rate: int, size: int, port: int = DEFAULT_PORT) -> list[str]:
    """``--full-rtt``: report round trips, not sockperf's default of half of them."""
    if seconds < 1 or int(seconds) != seconds:
        raise ValueError("sockperf takes a whole number of seconds, at least 1")
    if rate <= 0 or size < 14:
        raise ValueError("sockperf needs a positive rate and messages of at least 14 bytes")
    return ["sockperf", "ping-pong", "--tcp", "--ip", host, "--port", str(port),
            "--time", str(int(seconds)), "--mps", str(rate), "--msg-size", str(size), "--full-rtt"]


def percentiles(output: str) -> dict[float, float]:
    """Percentile -> round-trip µs, from sockperf's summary (e.g. {50.0: 72.7, 99.0: 131.9})."""
    text = _ANSI.sub("", output)
    found = {float(p): float(v) for p, v in _PERCENTILE.findall(text)}
    if not found:
        raise ToolOutputError("sockperf: no percentiles in the output (did the run fail?): "
                              + text.strip()[-300:])
    observations = _OBSERVATIONS.search(text)
    if observations and int(observations.group(1)) == 0:
        raise ToolOutputError("sockperf: zero observations")
    dropped = _DROPPED.search(text)
    if dropped and int(dropped.group(1)) > 0:
        raise ToolOutputError(f"sockperf: {dropped.group(1)} messages dropped")
    return found
