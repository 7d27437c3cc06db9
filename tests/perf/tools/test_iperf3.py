"""iperf3: its JSON report read, bad ones refused, the client argv."""
import json

import pytest

from shoal.perf.tools import ToolOutputError, iperf3


def iperf_report(bps: float) -> str:
    return json.dumps({"start": {}, "intervals": [], "end": {
        "sum_sent": {"bits_per_second": bps * 1.01},
        "sum_received": {"seconds": 2.0, "bytes": int(bps / 4), "bits_per_second": bps}}})



def test_iperf3_reads_receiver_rate_in_gbps():
    assert iperf3.received_gbps(iperf_report(15_000_907_305.0)) == pytest.approx(15.0009, rel=1e-4)
    assert iperf3.summarize([iperf_report(1e9), iperf_report(2e9)]) == [1.0, 2.0]



@pytest.mark.parametrize("text, message", [
    ("", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"error": "unable to connect to server: Connection refused"}), "Connection refused"),
    (json.dumps({"end": {}}), "sum_received"),
    (json.dumps({"end": {"sum_received": {"bits_per_second": -1}}}), "bad bits_per_second"),
])
def test_iperf3_rejects_bad_reports(text, message):
    with pytest.raises(ToolOutputError, match=message):
        iperf3.received_gbps(text)



def test_iperf3_client_argv_single_stream_json():
    argv = iperf3.client_argv("10.244.2.10", 1.5, port=15201)
    assert argv[:3] == ["iperf3", "--client", "10.244.2.10"]
    assert "--json" in argv and argv[argv.index("--parallel") + 1] == "1"
    assert argv[argv.index("--time") + 1] == "1.5" and argv[argv.index("--port") + 1] == "15201"
    with pytest.raises(ValueError):
        iperf3.client_argv("h", 0)



def test_iperf3_busy_server_is_its_own_error():
    busy = json.dumps({"start": {}, "error": "the server is busy running a test. try again later"})
    with pytest.raises(iperf3.ServerBusy):
        iperf3.received_gbps(busy)
