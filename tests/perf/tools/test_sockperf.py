"""sockperf: percentiles read (colours stripped), failed runs refused, the client argv."""
import pytest

from shoal.perf.tools import ToolOutputError, sockperf

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
