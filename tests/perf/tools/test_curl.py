"""curl: a download rate needs the whole body."""
import pytest

from shoal.perf.tools import ToolOutputError, curl


def test_curl_download_rate_needs_the_whole_body():
    assert curl.download_mb_per_s("100000000 250000000.000", 100_000_000) == pytest.approx(250.0)
    with pytest.raises(ToolOutputError, match="expected"):
        curl.download_mb_per_s("5000 250000000.000", 100_000_000)
    with pytest.raises(ToolOutputError):
        curl.download_mb_per_s("curl: (7) Failed to connect", 100_000_000)
