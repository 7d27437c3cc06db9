"""The real-process A/B reads h2load's count and the waypoint's CPU from /proc."""
from __future__ import annotations

import os
import time

from shoal.perf import waypointplain

H2LOAD_TAIL = """finished in 8.00s, 14413.83 req/s, 15.00MB/s
requests: 115311 total, 115327 started, 115311 done, 115310 succeeded, 1 failed, 0 errored, 0 timeout
status codes: 115310 2xx, 0 3xx, 0 4xx, 0 5xx
"""


def test_h2load_completed_requests_are_read_from_its_summary():
    found = waypointplain._DONE.search(H2LOAD_TAIL)
    assert found is not None and (found.group(1), found.group(2)) == ("115311", "115310")


def test_a_process_cpu_is_its_user_and_system_time():
    start = waypointplain._cpu_seconds(os.getpid())
    busy_until = time.process_time() + 0.2
    while time.process_time() < busy_until:
        pass
    assert waypointplain._cpu_seconds(os.getpid()) - start >= 0.1    # clock ticks: 10 ms steps
