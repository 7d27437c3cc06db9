"""The real-process A/B runs the waypoint as the perf scenario does."""
from __future__ import annotations

from shoal.perf import http


def test_the_waypoint_runs_plaintext_on_its_address_with_one_static_service():
    argv = http.waypoint_argv("127.0.0.1:18381", "127.0.0.1:18380", "perf")
    assert argv[argv.index("--plaintext") + 1] == "127.0.0.1:18381"
    assert argv[argv.index("--static-service") + 1] == "perf/origin=127.0.0.1:18380"
    assert "--no-flows" in argv and argv[argv.index("--access-log") + 1] == ""
    assert "--no-fast-path" not in argv
    assert http.waypoint_argv("127.0.0.1:1", "127.0.0.1:2", "perf", fast_path=False)[-1] == "--no-fast-path"
