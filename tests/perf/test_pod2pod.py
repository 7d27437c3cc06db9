"""pod2pod interleaves every path once per round, Shoal in the same rounds as direct and the peers; CPU per proxy."""
import json
import subprocess
from dataclasses import dataclass

from shoal.perf import pod2pod
from shoal.perf.pod2pod import PATH_SHOAL, RR, STREAM


def test_rounds_measure_every_path_once_per_round_in_order():
    order = list(pod2pod.rounds(["direct", "stunnel", "haproxy", "shoal-l4"], 3))
    assert order == [(rep, path) for rep in range(3) for path in ("direct", "stunnel", "haproxy", "shoal-l4")]
    assert list(pod2pod.rounds(["direct"], 0)) == []



@dataclass
class RecordingPod:
    """A pod whose tools answer at once with canned output, recording who ran what."""

    name: str
    calls: list[tuple[str, str]]
    namespace: str = "ns"
    node: str = "node-1"
    ip: str = "10.0.0.1"

    def run(self, argv, *, timeout, check=True):
        tool = argv[0]
        self.calls.append((self.name, tool))
        if tool == "iperf3":
            out = json.dumps({"end": {"sum_received": {"bits_per_second": 2e9}}})
        else:
            out = "sockperf: ---> percentile 99.000 = 300.0\nsockperf: ---> percentile 50.000 = 100.0\n"
        return subprocess.CompletedProcess(argv, 0, out, "")




def test_shoal_runs_in_the_same_rounds_as_direct_and_the_peers(fake_context):
    calls: list[tuple[str, str]] = []
    routes = [pod2pod.Route(name, RecordingPod(name, calls), "10.0.0.2")
              for name in ("direct", "stunnel", "haproxy", PATH_SHOAL)]
    figures = list(pod2pod.measure_interleaved(fake_context(), routes))
    names = [r.path for r in routes]
    # Throughput rounds first, then latency rounds; inside each, every path back to back.
    assert calls == ([(n, "iperf3") for n in names] * 2) + ([(n, "sockperf") for n in names] * 2)
    by_key = {(m.benchmark, m.metric, m.path): m for m in figures}
    assert by_key[(STREAM, "throughput", PATH_SHOAL)].samples == (2.0, 2.0)
    assert by_key[(RR, "p50", PATH_SHOAL)].samples == (100.0, 100.0)



def test_cpu_is_reported_per_proxy(monkeypatch, fake_context):
    calls: list[tuple[str, str]] = []

    class FixedSampler:
        def __init__(self, pids):
            self.usage = None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.usage = type("Usage", (), {"cpu_cores": 0.2, "rss_peak_mb": 40.0})()

    monkeypatch.setattr(pod2pod.procstat, "ProcessSampler", FixedSampler)
    route = pod2pod.Route(PATH_SHOAL, RecordingPod(PATH_SHOAL, calls), "10.0.0.2", processes=lambda: [1, 2])
    figures = {(m.metric): m for m in pod2pod.measure_interleaved(fake_context(repetitions=1), [route])
               if m.benchmark == RR}
    assert figures["cpu"].samples == (0.2,)
    assert figures["cpu_per_proxy"].samples == (0.1,)
