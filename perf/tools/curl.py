"""curl download rate: one GET, the body discarded, curl's own average speed."""
from __future__ import annotations

from shoal.perf.tools import ToolOutputError

_MB = 1e6


def download_argv(url: str, timeout: float) -> list[str]:
    return ["curl", "--silent", "--show-error", "--fail", "--max-time", f"{timeout:g}", "--output", "/dev/null",
            "--write-out", "%{size_download} %{speed_download}", url]


def download_mb_per_s(output: str, expected_bytes: int) -> float:
    """MB/s (10^6 bytes) of a complete download; a short body raises (a cut transfer is no figure)."""
    try:
        size, speed = (float(field) for field in output.split())
    except ValueError:
        raise ToolOutputError(f"curl: unexpected --write-out output {output.strip()[-200:]!r}") from None
    if size != expected_bytes:
        raise ToolOutputError(f"curl: downloaded {size:.0f} bytes, expected {expected_bytes}")
    if speed <= 0:
        raise ToolOutputError("curl: zero download speed")
    return speed / _MB
