"""The node proxy's side of 15008's kernel penalty box: what it writes to the agent's map
(the drop itself: tests/agent/test_loader_families.py)."""
from __future__ import annotations

import logging
import time

import pytest

from shoal.datapath.penaltybox import MAP_NAME, KernelPenaltyBox, PenaltyBoxPublisher
from tests.agent.agentbed import agent_bed, datapath  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]


def test_a_boxing_writes_its_expiry_on_the_kernels_clock_for_either_family(agent_bed, datapath):
    with KernelPenaltyBox(agent_bed.pin_dir) as box:
        for source in ("10.99.0.7", "fd00:99::7"):
            start = time.monotonic_ns()
            box.box(source, seconds=4.0)
            until = box.until(source)
            assert until is not None and start + 4e9 <= until <= time.monotonic_ns() + 4e9
        assert box.until("10.99.0.8") is None
        box.box("10.99.0.7", seconds=1.0)   # a later boxing replaces the expiry
        assert box.until("10.99.0.7") <= time.monotonic_ns() + 1e9


def test_the_publisher_writes_once_the_agent_pinned_the_map_and_never_raises(agent_bed, datapath, tmp_path,
                                                                              caplog):
    missing = PenaltyBoxPublisher(tmp_path / "no-agent-yet")
    with caplog.at_level(logging.WARNING, logger="shoal.datapath.penaltybox"):
        assert missing.box("10.99.0.9", 2.0) is False
        assert missing.box("10.99.0.9", 2.0) is False
        assert PenaltyBoxPublisher(agent_bed.pin_dir).box("not an address", 2.0) is False
    assert [r.message.count(MAP_NAME) for r in caplog.records] == [1, 1]   # once per kind of failure
    assert PenaltyBoxPublisher(agent_bed.pin_dir).box("10.99.0.9", 2.0) is True
    with KernelPenaltyBox(agent_bed.pin_dir) as box:
        assert box.until("10.99.0.9") is not None
