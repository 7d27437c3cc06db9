"""redis-benchmark: rates per test read, failed runs refused."""
import pytest

from shoal.perf.tools import ToolOutputError, redisbench

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
