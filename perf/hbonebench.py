"""Interleaved loopback bench of the HBONE data path alone (no cluster): direct, the
haproxy mTLS pair, and the local HBONE pair (``shoal.perf.hbonepair``, its two ends in two
processes, as haproxy's) on the fast path and on the h2 path, every path once per round,
back to back, so load hits them alike.

    python -m shoal.perf.hbonebench [--rounds 3] [--seconds 3]

Prints a Markdown table: iperf3 single stream each way (``-R``: the server end sends, as in
a download; each × haproxy; the forward one also as CPU per GB of both ends, steadier
than the rate on a busy machine), sockperf 1 KiB ping-pong
at 1,000/s (p50, added p50 over direct, p99) and the CPU of both ends during it. A
development tool for A/B runs of the two paths; the node proxy's own figures come from
the ``baseline`` scenario.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shoal.perf import hbonepair, peers
from shoal.perf.beds import procs as bedprocs
from shoal.perf.procstat import cpu_seconds
from shoal.perf.tools import sockperf

PORTS = {"iperf": 6201, "sockperf": 6202}


def _cpu_seconds(pids: list[int]) -> float:
    return sum(map(cpu_seconds, pids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=3)
    args = parser.parse_args()
    procs: list[subprocess.Popen] = []
    work = Path(tempfile.mkdtemp(prefix="hbonebench-"))

    def spawn(argv: list[str], log: str) -> subprocess.Popen:
        proc = bedprocs.spawn(argv, work / log)
        procs.append(proc)
        return proc

    try:
        spawn(["iperf3", "-s", "-p", str(PORTS["iperf"])], "iperf3.log")
        spawn(sockperf.server_argv("127.0.0.1", PORTS["sockperf"]), "sockperf.log")
        certs = peers.mint_certificates(work / "certs", "127.0.0.1")
        forwards = (peers.Forward("stream", 6301, 6302, PORTS["iperf"]), peers.Forward("rr", 6303, 6304, PORTS["sockperf"]))
        (work / "server.cfg").write_text(peers.haproxy_server_config(certs, "127.0.0.1", forwards))
        (work / "client.cfg").write_text(peers.haproxy_client_config(certs, "127.0.0.1", forwards))
        haproxy = [spawn(["haproxy", "-db", "-f", str(work / f"{end}.cfg")], f"haproxy-{end}.log").pid
                   for end in ("server", "client")]
        paths: dict[str, tuple[int, int, list[int]]] = {"direct": (PORTS["iperf"], PORTS["sockperf"], []),
                                                         "haproxy": (6301, 6303, haproxy)}
        (work / "pair-certs").mkdir()
        hbonepair.tls_contexts(work / "pair-certs")   # made once: both ends of every pair load it
        for n, path in enumerate(("fast", "h2")):
            ends = []
            for i, upstream in enumerate(PORTS.values()):
                # Two processes per pair, as two node proxies (and as haproxy's two ends).
                common = ["--upstream", f"127.0.0.1:{upstream}", "--client-path", path, "--server-path", path,
                          "--tls-port", str(6501 + 2 * n + i), "--certs", str(work / "pair-certs")]
                ends.append(spawn([sys.executable, "-m", "shoal.perf.hbonepair", "--role", "server", *common],
                                  f"pair-{path}-{i}-server.log").pid)
                ends.append(spawn([sys.executable, "-m", "shoal.perf.hbonepair", "--role", "client",
                                   "--listen", str(6401 + 2 * n + i), *common], f"pair-{path}-{i}-client.log").pid)
            paths[f"shoal-{path}"] = (6401 + 2 * n, 6402 + 2 * n, ends)
        time.sleep(1)
        for log in work.glob("pair-*.log"):   # every end says when it serves (a loaded machine imports slowly)
            deadline = time.monotonic() + 60
            while "hbone pair (" not in log.read_text():
                exited = [proc.args for proc in procs if proc.poll() is not None]
                if time.monotonic() > deadline or exited:
                    raise RuntimeError(f"{log.name} did not start (exited: {exited}): {log.read_text()[-2000:]}")
                time.sleep(0.2)
        results: dict[str, dict[str, list[float]]] = {
            p: {"gbps": [], "gbps_reverse": [], "cpu_gb": [], "p50": [], "p99": [], "cpu": []} for p in paths}
        for round_ in range(args.rounds):
            for name, (stream_port, rr_port, pids) in paths.items():
                for key, direction in (("gbps", []), ("gbps_reverse", ["-R"])):
                    before = _cpu_seconds(pids)
                    out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(stream_port), "-t", str(args.seconds),
                                          "-J", *direction], capture_output=True, text=True, check=True).stdout
                    received = json.loads(out)["end"]["sum_received"]
                    results[name][key].append(received["bits_per_second"] / 1e9)
                    if key == "gbps":   # CPU per byte: steadier than the rate on a busy machine
                        results[name]["cpu_gb"].append((_cpu_seconds(pids) - before) * 1e3 / (received["bytes"] / 1e9))
                before = _cpu_seconds(pids)
                out = subprocess.run(sockperf.client_argv("127.0.0.1", args.seconds, 1000, 1024, rr_port),
                                     capture_output=True, text=True, check=True).stdout
                results[name]["cpu"].append((_cpu_seconds(pids) - before) / args.seconds)
                percentiles = sockperf.percentiles(out)
                results[name]["p50"].append(percentiles[50.0])
                results[name]["p99"].append(percentiles[99.0])
            print(f"round {round_ + 1} of {args.rounds} done", file=sys.stderr, flush=True)
        med = {p: {k: statistics.median(v) for k, v in d.items()} for p, d in results.items()}
        print(f"load1 {os.getloadavg()[0]:.1f}; {args.rounds} rounds x {args.seconds} s; medians")
        print("| path | stream Gbit/s | × haproxy | CPU ms per GB, both ends | reverse (-R) Gbit/s | × haproxy | "
              "1 KiB RR p50 µs | added p50 µs | p99 µs | cores, both ends, at 1,000 req/s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, m in med.items():
            print(f"| {name} | {m['gbps']:.2f} | {m['gbps'] / med['haproxy']['gbps']:.2f} | {m['cpu_gb']:.0f} | "
                  f"{m['gbps_reverse']:.2f} | {m['gbps_reverse'] / med['haproxy']['gbps_reverse']:.2f} | {m['p50']:.0f} | "
                  f"{m['p50'] - med['direct']['p50']:+.0f} | {m['p99']:.0f} | {m['cpu']:.3f} |")
    finally:
        for proc in procs:
            bedprocs.stop(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
