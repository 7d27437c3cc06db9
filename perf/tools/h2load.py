"""h2load at a fixed request rate, for HTTP scenarios: per-request latencies from ``--log-file``.

h2load prints only min/max/mean of request times, but ``--log-file`` writes one line per
request: ``<start µs since epoch>\\t<status>\\t<µs until the end of the response>``.
"""
from __future__ import annotations

import re

from shoal.perf.tools import ToolOutputError


def client_argv(url: str, seconds: float, rate: int, log_file: str, *, clients: int = 1,
                http1: bool = True, data_file: str | None = None, warmup: float = 0.0) -> list[str]:
    """``rate`` is the total; h2load's ``--rps`` is per client, so it is split evenly."""
    if rate <= 0 or clients <= 0 or rate % clients:
        raise ValueError("the rate must be a positive multiple of the client count")
    argv = ["h2load", "--clients", str(clients), "--rps", str(rate // clients),
            "--duration", f"{seconds:g}", "--log-file", log_file]
    if warmup:
        argv += ["--warm-up-time", f"{warmup:g}"]
    if http1:
        argv.append("--h1")
    if data_file:
        argv += ["--data", data_file]
    return [*argv, url]


def latencies_us(log_text: str) -> tuple[list[float], dict[int, int]]:
    """(latencies of 2xx/3xx responses in µs, {other status: count})."""
    good: list[float] = []
    bad: dict[int, int] = {}
    for number, line in enumerate(log_text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ToolOutputError(f"h2load log line {number}: expected 3 tab-separated fields")
        try:
            status, elapsed = int(fields[1]), float(fields[2])
        except ValueError as exc:
            raise ToolOutputError(f"h2load log line {number}: {exc}") from exc
        if 200 <= status < 400:
            good.append(elapsed)
        else:
            bad[status] = bad.get(status, 0) + 1
    if not good:
        if not bad:
            raise ToolOutputError("h2load: the log is empty, no request completed")
        raise ToolOutputError(f"h2load: no successful request; statuses {dict(sorted(bad.items()))}")
    return good, bad


_FINISHED = re.compile(r"finished in ([\d.]+)s, ([\d.]+) req/s")
_REQUESTS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                       r"(\d+) failed, (\d+) errored, (\d+) timeout")


def max_rate_argv(url: str, seconds: float, connections: int, *, http1: bool = True,
                  data_file: str | None = None) -> list[str]:
    """As many requests as the path takes: ``connections`` clients on one h2load thread."""
    argv = ["h2load", "--clients", str(connections), "--threads", "1", "--duration", f"{seconds:g}"]
    if http1:
        argv.append("--h1")
    if data_file:
        argv += ["--data", data_file]
    return [*argv, url]


def summary_rate(output: str) -> float:
    """req/s from h2load's summary; refuses runs where any request failed."""
    return _summary(output)[0]


def summary_succeeded(output: str) -> int:
    """The requests h2load completed, from its summary; refuses runs where any failed."""
    return _summary(output)[1]


def _summary(output: str) -> tuple[float, int]:
    finished = _FINISHED.search(output)
    counts = _REQUESTS.search(output)
    if not finished or not counts:
        raise ToolOutputError("h2load: no summary in the output: " + output.strip()[-300:])
    total, _, _, succeeded, failed, errored, timeout = map(int, counts.groups())
    if failed or errored or timeout or succeeded == 0:
        raise ToolOutputError(f"h2load: {succeeded}/{total} succeeded, {failed} failed, "
                              f"{errored} errored, {timeout} timed out")
    return float(finished.group(2)), succeeded
