"""CPU per request of a real plaintext waypoint process at its maximum rate, A/B between trees.

    python -m shoal.perf.waypointplain --tree new= --tree old=/tmp/old-layout [--rounds 4] [--seconds 8]

The perf scenario's plain path on loopback, without a cluster: a haproxy origin answering
every request with 1 KiB, a waypoint process (``python -m shoal.waypoint --plaintext``,
``--no-flows``, no access log, as the scenario runs it) and ``h2load --h1 -c 16 -t 1`` POSTing
1 KiB for ``--seconds``. The figure is the waypoint's utime+stime (/proc/PID/stat) over the
run divided by the requests h2load completed: CPU per request, which depends much less on a
loaded machine than the rate does. Trees alternate round by round (interleaved A/B); each
``--tree NAME=PATH`` runs the waypoint with ``PYTHONPATH=PATH`` (empty: the installed tree).
PATH must lay the package out as installed (``PATH/shoal/waypoint`` ...): a plain checkout
does not, the editable install would import the current tree's waypoint instead.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from shoal.perf.http import MAX_CONNECTIONS, body_file, origin_config, waypoint_argv
from shoal.perf.procstat import cpu_seconds
from shoal.perf.tools import h2load


def _wait_listening(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def one_round(pythonpath: str, port: int, origin_port: int, body: Path, seconds: float) -> dict[str, float]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    else:
        env.pop("PYTHONPATH", None)
    argv = waypoint_argv(f"127.0.0.1:{port}", f"127.0.0.1:{origin_port}", "perf")
    waypoint = subprocess.Popen(argv, env=env, cwd="/tmp")
    try:
        _wait_listening(port)
        url = f"http://127.0.0.1:{port}/"
        # Warm first (pooled connections, caches), then measure: the scenario's max-rate run.
        subprocess.run(h2load.max_rate_argv(url, 2, MAX_CONNECTIONS, data_file=str(body)), check=True,
                       capture_output=True)
        load1 = os.getloadavg()[0]
        before = cpu_seconds(waypoint.pid)
        done = subprocess.run(h2load.max_rate_argv(url, seconds, MAX_CONNECTIONS, data_file=str(body)),
                              check=True, capture_output=True, text=True)
        cpu = cpu_seconds(waypoint.pid) - before
    finally:
        waypoint.terminate()
        waypoint.wait(10)
    succeeded = h2load.summary_succeeded(done.stdout)
    return {"requests": succeeded, "rate": succeeded / seconds, "cpu_us": cpu / succeeded * 1e6, "load1": load1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=PYTHONPATH (empty: installed)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--port", type=int, default=18381, help="the waypoint's; the origin's is port-1")
    args = parser.parse_args()
    trees = [tuple(t.split("=", 1)) for t in args.tree]
    origin_port = args.port - 1
    with tempfile.TemporaryDirectory(prefix="waypointplain-") as work:
        body = body_file(Path(work))
        config = Path(work) / "origin.cfg"
        config.write_text(origin_config(origin_port, body).replace("0.0.0.0", "127.0.0.1"))
        origin = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            _wait_listening(origin_port)
            results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in trees}
            for number in range(args.rounds):
                order = trees if number % 2 == 0 else trees[::-1]
                for name, path in order:
                    got = one_round(path, args.port, origin_port, body, args.seconds)
                    results[name].append(got)
                    print(f"round {number + 1} {name}: {got['cpu_us']:.1f} µs CPU/request, {got['rate']:.0f} req/s, "
                          f"load1 {got['load1']:.2f}", flush=True)
        finally:
            origin.terminate()
            origin.wait(10)
    for name, rounds in results.items():
        print(f"{name}: median {statistics.median(r['cpu_us'] for r in rounds):.1f} µs CPU/request, "
              f"{statistics.median(r['rate'] for r in rounds):.0f} req/s "
              f"(rounds: {', '.join('%.1f' % r['cpu_us'] for r in rounds)})")


if __name__ == "__main__":
    main()
