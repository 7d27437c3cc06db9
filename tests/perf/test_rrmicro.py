"""The request/response micro-bench drives the real session and stream drivers: every
request and response crosses both ends whole, on one stream and on several."""
from __future__ import annotations

import pytest

from shoal.perf import rrmicro

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("streams", [1, 3])
async def test_every_request_and_response_crosses_both_ends(streams):
    per_request = await rrmicro.run(requests=300, size=1024, streams=streams)
    assert 0 < per_request < 0.05
