"""The waypoint's in-process mesh bench drives the real waypoint: every request answered,
on the fast path, each with its access log line (what an A/B with it compares)."""
from __future__ import annotations

import pytest

from shoal.perf import waypointmicro

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("telemetry", [True, False])
async def test_every_request_goes_through_the_waypoint_on_its_fast_path(telemetry):
    result = await waypointmicro.run(requests=300, telemetry=telemetry)
    assert result["fast_path"] == 1.0
    assert result["logged"] == (350 if telemetry else 0)     # the 50 warm-up requests and the 300
    assert 0 < result["cpu_per_request"] < 0.05
