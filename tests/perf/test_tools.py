import json

import pytest

from shoal.perf.tools import ToolOutputError, curl, h2load, iperf3, pgbench, redisbench, sockperf

SOCKPERF_OUTPUT = """sockperf: \x1b[2;35m== version #3.7-no.git == \x1b[0m
sockperf[CLIENT] send on:sockperf: using recvfrom() to block on socket(s)

[ 0] IP = 10.244.2.10     PORT = 11111 # TCP
sockperf: Warmup stage (sending a few dummy messages)...
sockperf: Starting test...
sockperf: Test end (interrupted by timer)
sockperf: Test ended
sockperf: [Total Run] RunTime=3.000 sec; Warm up time=400 msec; SentMessages=3001; ReceivedMessages=3001
sockperf: ========= Printing statistics for Server No: 0
sockperf: [Valid Duration] RunTime=2.549 sec; SentMessages=2550; ReceivedMessages=2550
sockperf: \x1b[2;35m====> avg-rtt=78.385 (std-dev=62.975)\x1b[0m
sockperf: # dropped messages = 0; # duplicated messages = 0; # out-of-order messages = 0
sockperf: Summary: Round trip is 78.385 usec
sockperf: \x1b[2;35mTotal 2550 observations\x1b[0m; each percentile contains 25.50 observations
sockperf: ---> <MAX> observation = 2379.852
sockperf: ---> percentile 99.999 = 2379.852
sockperf: ---> percentile 99.990 = 2379.852
sockperf: ---> percentile 99.900 =  405.276
sockperf: ---> percentile 99.000 =  131.877
sockperf: ---> percentile 90.000 =   87.621
sockperf: ---> percentile 75.000 =   83.645
sockperf: ---> percentile 50.000 =   72.688
sockperf: ---> percentile 25.000 =   68.442
sockperf: ---> <MIN> observation =   21.872
"""


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


def test_sockperf_percentiles_strip_colours():
    pct = sockperf.percentiles(SOCKPERF_OUTPUT)
    assert pct[50.0] == 72.688 and pct[99.0] == 131.877 and pct[99.999] == 2379.852
    assert len(pct) == 8


def test_sockperf_rejects_failed_runs():
    with pytest.raises(ToolOutputError, match="no percentiles"):
        sockperf.percentiles("sockperf: ERROR: Failed to connect to server\n")
    with pytest.raises(ToolOutputError, match="dropped"):
        sockperf.percentiles(SOCKPERF_OUTPUT.replace("# dropped messages = 0", "# dropped messages = 7"))


def test_sockperf_client_argv_fixed_rate_round_trips():
    argv = sockperf.client_argv("127.0.0.1", 2, 1000, 1024, port=20003)
    assert argv[:3] == ["sockperf", "ping-pong", "--tcp"]
    for flag, value in (("--mps", "1000"), ("--msg-size", "1024"), ("--time", "2"), ("--port", "20003")):
        assert argv[argv.index(flag) + 1] == value
    assert "--full-rtt" in argv
    for bad in ((1.5, 1000, 1024), (2, 0, 1024), (2, 1000, 8)):
        with pytest.raises(ValueError):
            sockperf.client_argv("h", *bad)


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


def test_h2load_max_rate_argv_one_thread():
    argv = h2load.max_rate_argv("http://127.0.0.1:18081/", 2, 16, data_file="/tmp/b")
    assert argv[argv.index("--threads") + 1] == "1" and argv[argv.index("--clients") + 1] == "16"
    assert "--rps" not in argv and argv[argv.index("--data") + 1] == "/tmp/b"


def test_http_haproxy_configs(tmp_path):
    from shoal.perf import http
    body = http.body_file(tmp_path)
    assert body.stat().st_size == http.BODY_SIZE
    origin = http.origin_config(18080, body)
    assert "bind 0.0.0.0:18080" in origin and f"file {body}" in origin and "nbthread 1" in origin
    proxy = http.proxy_config("0.0.0.0:18081", "10.244.2.10:18080", threads=1)
    assert "mode http" in proxy and "server origin 10.244.2.10:18080" in proxy


def test_iperf3_busy_server_is_its_own_error():
    busy = json.dumps({"start": {}, "error": "the server is busy running a test. try again later"})
    with pytest.raises(iperf3.ServerBusy):
        iperf3.received_gbps(busy)


REDIS_CSV = '''"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
"SET","25974.03","0.519","0.072","0.311","0.711","5.783","6.527"
"GET","42553.19","0.307","0.104","0.303","0.463","0.599","0.951"
'''


def test_redis_benchmark_rates_per_test():
    assert redisbench.rates("WARNING: noise\n" + REDIS_CSV) == {"SET": 25974.03, "GET": 42553.19}
    argv = redisbench.client_argv("10.0.0.2", 1000, pipeline=16)
    assert argv[argv.index("-c") + 1] == "20" and argv[argv.index("-P") + 1] == "16" and "--csv" in argv


@pytest.mark.parametrize("text", ["Could not connect to Redis at 10.0.0.2:6379: Connection refused",
                                  REDIS_CSV.replace("42553.19", "0")])
def test_redis_benchmark_rejects_failed_runs(text):
    with pytest.raises(ToolOutputError):
        redisbench.rates(text)


PGBENCH_OUTPUT = """transaction type: <builtin: select only>
number of clients: 8
number of transactions actually processed: 41250
number of failed transactions: 0 (0.000%)
latency average = 0.580 ms
initial connection time = 12.345 ms
tps = 13792.118852 (without initial connection time)
"""


def test_pgbench_tps_and_failures():
    assert pgbench.tps(PGBENCH_OUTPUT) == pytest.approx(13792.118852)
    with pytest.raises(ToolOutputError, match="failed transactions"):
        pgbench.tps(PGBENCH_OUTPUT.replace("failed transactions: 0", "failed transactions: 3"))
    with pytest.raises(ToolOutputError, match="no tps"):
        pgbench.tps('pgbench: error: connection to server at "10.0.0.2", port 5432 failed')
    argv = pgbench.select_argv("10.0.0.2", 5)
    assert "-S" in argv and argv[argv.index("-c") + 1] == "8"


def test_curl_download_rate_needs_the_whole_body():
    assert curl.download_mb_per_s("100000000 250000000.000", 100_000_000) == pytest.approx(250.0)
    with pytest.raises(ToolOutputError, match="expected"):
        curl.download_mb_per_s("5000 250000000.000", 100_000_000)
    with pytest.raises(ToolOutputError):
        curl.download_mb_per_s("curl: (7) Failed to connect", 100_000_000)
