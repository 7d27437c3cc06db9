"""The real-process mesh bench drives a forked waypoint over mTLS HBONE: every request gets
the origin's answer through it, and its CPU is measured (what an A/B with it compares)."""
from __future__ import annotations

import pytest

from shoal.perf import waypointreal

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("telemetry", [True, False])
def test_the_forked_waypoint_answers_every_request_and_its_cpu_is_measured(telemetry):
    args = waypointreal.parse(["--requests", "300", "--rate", "0"] + ([] if telemetry else ["--no-telemetry"]))
    result = waypointreal.measure(args)      # raises if an answer is not the origin's, or late
    assert 0 < result["cpu_per_request"] < 0.05
    assert 0 < result["p50"] <= result["p99"] < 5
    assert result["rate"] > 0
