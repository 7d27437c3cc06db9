"""h2load: latencies, errors and rates read from its logs and summary; the argv."""
import pytest

from shoal.perf.tools import ToolOutputError, h2load


def test_h2load_log_latencies_and_errors():
    log = "1700000000000000\t200\t812\n1700000000001000\t200\t640\n1700000000002000\t503\t90\n\n"
    good, bad = h2load.latencies_us(log)
    assert good == [812.0, 640.0] and bad == {503: 1}



@pytest.mark.parametrize("log, message", [
    ("1\t200\n", "3 tab-separated"),
    ("1\tOK\t5\n", "line 1"),
    ("1\t500\t5\n2\t503\t5\n1\t500\t5\n", "no successful request; statuses {500: 2, 503: 1}"),
    ("\n", "log is empty"),
])
def test_h2load_rejects_bad_logs(log, message):
    with pytest.raises(ToolOutputError, match=message):
        h2load.latencies_us(log)



def test_h2load_total_rate_split_over_clients():
    argv = h2load.client_argv("http://10.244.2.10:8080/", 5, 1000, "/tmp/x.log", clients=4)
    assert argv[argv.index("--rps") + 1] == "250" and "--h1" in argv and argv[-1].startswith("http://")
    with pytest.raises(ValueError):
        h2load.client_argv("http://x/", 5, 1000, "/tmp/x.log", clients=3)



H2LOAD_SUMMARY = """finished in 2.00s, 996.00 req/s, 1.04MB/s
requests: 1992 total, 1993 started, 1992 done, 1992 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 1992 2xx, 0 3xx, 0 4xx, 0 5xx
"""



def test_h2load_summary_rate():
    assert h2load.summary_rate("starting benchmark...\n" + H2LOAD_SUMMARY) == 996.0
    failing = H2LOAD_SUMMARY.replace("1992 succeeded, 0 failed", "1900 succeeded, 92 failed")
    with pytest.raises(ToolOutputError, match="92 failed"):
        h2load.summary_rate(failing)
    with pytest.raises(ToolOutputError, match="no summary"):
        h2load.summary_rate("connect: Connection refused\n")


def test_h2load_summary_succeeded_is_the_completed_count():
    assert h2load.summary_succeeded(H2LOAD_SUMMARY) == 1992
    with pytest.raises(ToolOutputError, match="1 failed"):
        h2load.summary_succeeded(H2LOAD_SUMMARY.replace("1992 succeeded, 0 failed", "1991 succeeded, 1 failed"))



def test_h2load_max_rate_argv_one_thread():
    argv = h2load.max_rate_argv("http://127.0.0.1:18081/", 2, 16, data_file="/tmp/b")
    assert argv[argv.index("--threads") + 1] == "1" and argv[argv.index("--clients") + 1] == "16"
    assert "--rps" not in argv and argv[argv.index("--data") + 1] == "/tmp/b"
