"""Issue 4's "shows when done", on the shared real local cluster (controller, agents,
node proxies): only TLS on the fabric, STRICT vs PERMISSIVE, an ALLOW that denies, a
node proxy restart under load that refuses nothing. Every change is undone."""
from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import time

import pytest

from shoal.perf.connscripts import ECHO_APP, HOLD_CLIENT
from tests.conftest import eventually, pod_exec, pod_ip, shoal_cli

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

STRICT = """
apiVersion: security.shoal.io/v1
kind: PeerAuthentication
metadata: {name: zt-strict, namespace: demo}
spec: {mtls: {mode: STRICT}}
"""

ALLOW_OTHER_ONLY = """
apiVersion: security.shoal.io/v1
kind: AuthorizationPolicy
metadata: {name: zt-allow-other-only, namespace: demo}
spec:
  selector: {matchLabels: {app: db}}
  action: ALLOW
  rules:
    - from: [{source: {principals: ["cluster.local/ns/demo/sa/not-the-client"]}}]
"""

# Opens connections at a fixed rate; each must get an HTTP answer. Prints a JSON summary:
# each failure as (seconds since the load started, when it was opened; what went wrong, at
# which step), and the load's start as wall-clock time (to find it in the proxies' logs).
LOAD = """
import asyncio, json, sys, time
host, port, rate, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
ok, failed = 0, []
async def one(opened):
    global ok
    step = "connect"
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        step = "read"
        w.write(b"GET / HTTP/1.0\\r\\nHost: web\\r\\n\\r\\n")
        data = await asyncio.wait_for(r.read(), 5)
        w.close()
        if data.startswith(b"HTTP/1"):
            ok += 1
        else:
            failed.append([round(opened, 3), round(time.monotonic() - start, 3), step, repr(data[:40])])
    except (OSError, asyncio.TimeoutError) as exc:
        failed.append([round(opened, 3), round(time.monotonic() - start, 3), step, repr(exc)])
async def main():
    global start
    tasks, start, wall = [], time.monotonic(), time.time()
    for i in range(int(rate * seconds)):
        tasks.append(asyncio.ensure_future(one(time.monotonic() - start)))
        await asyncio.sleep(max(0, start + (i + 1) / rate - time.monotonic()))
    await asyncio.gather(*tasks)
    print(json.dumps({"ok": ok, "failed": failed, "started": wall}))
asyncio.run(main())
"""

PROBE = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    c.sendall(sys.argv[3].encode() + b"\\n")
    c.settimeout(3)
    print("reply:", c.recv(200).decode(errors="replace").strip())
except OSError as exc:
    print("error:", type(exc).__name__, exc)
"""


def pods(layout) -> dict[str, dict]:
    out = shoal_cli(layout, "get", "pods", "-A", "-o", "json").stdout
    items = json.loads(out)
    items = items.get("items", items) if isinstance(items, dict) else items
    return {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p for p in items}




def probe(layout, src: str, ip: str, port: int, payload: str = "GET / HTTP/1.0\r\n") -> str:
    return pod_exec(layout, src, sys.executable, "-c", PROBE, ip, str(port), payload, check=False).stdout.strip()


def proxy_metric(layout, node: str, name: str, **labels) -> float:
    out = subprocess.run(["ip", "netns", "exec", layout.node_netns(node), sys.executable, "-c",
                          "import urllib.request;print(urllib.request.urlopen("
                          "'http://127.0.0.1:15020/metrics', timeout=5).read().decode())"],
                         capture_output=True, text=True, timeout=30).stdout
    total = 0.0
    for line in out.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_cross_node_traffic_is_only_tls_on_15008(demo_cluster):
    layout = demo_cluster.layout
    client, web1 = pod_ip(layout, "demo/client-0"), pod_ip(layout, "demo/web-1")
    get = "GET / HTTP/1.0\r\nHost: web\r\n"
    eventually(lambda: "HTTP/1" in probe(layout, "demo/client-0", web1, 8080, get), "web-1 enrolled")
    capture = subprocess.Popen(["ip", "netns", "exec", layout.control_netns, "tcpdump", "-i", "fabric0", "-nn",
                                "-A", "-s", "0", "-c", "400", f"host {client}"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, errors="replace")
    try:
        time.sleep(1)
        answers = [probe(layout, "demo/client-0", web1, 8080, "GET / HTTP/1.0\r\nHost: web\r\n") for _ in range(3)]
        time.sleep(1)
    finally:
        capture.terminate()
        dump = capture.communicate(timeout=10)[0]
    assert all("HTTP/1" in a for a in answers), answers
    assert f"{web1}.15008" in dump             # the tunnel crossed the fabric...
    assert f"{web1}.8080" not in dump          # ...never the app port...
    assert "GET / HTTP" not in dump and "hello from" not in dump  # ...and no plaintext HTTP


def test_strict_blocks_plaintext_from_legacy_permissive_lets_it_in(demo_cluster):
    layout = demo_cluster.layout
    web1 = pod_ip(layout, "demo/web-1")
    eventually(lambda: "HTTP/1" in probe(layout, "legacy/client-0", web1, 8080, "GET / HTTP/1.0\r\nHost: web\r\n"),
               "legacy to reach web-1")
    plain_before = proxy_metric(layout, "node-2", "istio_tcp_connections_opened_total",
                                reporter="destination", connection_security_policy="none")
    assert plain_before >= 1  # PERMISSIVE: in, and counted as plaintext
    shoal_cli(layout, "apply", "-f", "-", input=STRICT)
    try:
        eventually(lambda: "HTTP/1" not in probe(layout, "legacy/client-0", web1, 8080,
                                                 "GET / HTTP/1.0\r\nHost: web\r\n"), "STRICT to apply")
        assert proxy_metric(layout, "node-2", "shoal_proxy_rejected_total", reason="strict_mtls") >= 1
        # meshed clients still get in over mTLS
        assert "HTTP/1" in probe(layout, "demo/client-0", web1, 8080, "GET / HTTP/1.0\r\nHost: web\r\n")
    finally:
        shoal_cli(layout, "delete", "-f", "-", input=STRICT)
    eventually(lambda: "HTTP/1" in probe(layout, "legacy/client-0", web1, 8080, "GET / HTTP/1.0\r\nHost: web\r\n"),
               "PERMISSIVE again")


def test_allow_policy_naming_another_account_denies_client_to_db(demo_cluster):
    layout = demo_cluster.layout
    eventually(lambda: "reply: db" in probe(layout, "demo/client-0", "db.demo", 7000, "hello"), "db reachable")
    denied_before = proxy_metric(layout, "node-2", "shoal_proxy_rejected_total", reason="policy_denied")
    shoal_cli(layout, "apply", "-f", "-", input=ALLOW_OTHER_ONLY)
    try:
        eventually(lambda: "reply: db" not in probe(layout, "demo/client-0", "db.demo", 7000, "hello"),
                   "the ALLOW policy to apply")
        assert proxy_metric(layout, "node-2", "shoal_proxy_rejected_total", reason="policy_denied") > denied_before
        assert proxy_metric(layout, "node-2", "istio_tcp_connections_closed_total", reporter="destination",
                            response_flags="UAEX", source_principal="spiffe://cluster.local/ns/demo/sa/client") >= 1
    finally:
        shoal_cli(layout, "delete", "-f", "-", input=ALLOW_OTHER_ONLY)
    eventually(lambda: "reply: db" in probe(layout, "demo/client-0", "db.demo", 7000, "hello"), "policy removal")


RESTART_METRICS = ("shoal_proxy_rejected_total", "shoal_proxy_overloaded", "shoal_proxy_accept_paused_total",
                   "shoal_proxy_hbone_connections", "shoal_proxy_enrolled_pods", "shoal_proxy_bypass_connections_total",
                   "shoal_proxy_setup_wait_seconds_sum", "shoal_proxy_setup_wait_seconds_count")


def _worth_reporting(log_line: str) -> bool:
    """A log line that may explain a failure: not an access-log line of a connection that
    went well, not the body of a traceback (its last line, the exception, is kept)."""
    if log_line.startswith("{"):
        return '"response_flags":"-"' not in log_line
    return not log_line.startswith((" ", "Traceback", "future:"))


def restart_failure_report(layout, node: str, result: dict, load_stderr: str, log_from: dict[str, int],
                           restarted_at: float) -> str:
    """Why connections failed across a restart, from every side: the client's errors (when
    each was opened and ended, relative to the load's start, and at which step), the proxy
    restart's time on that scale, the node's proxy and agent log lines since the load began
    (old and new proxy log to the same file; access-log lines only for failed connections),
    and the new proxy's refusal, overload, HBONE and bypass metrics."""
    kinds = collections.Counter((step, error) for _, _, step, error in result["failed"])
    opened = [failure[0] for failure in result["failed"]] or [0.0]
    lines = [f"{len(result['failed'])} failed, {result['ok']} ok; proxy restarted at "
             f"{restarted_at - result['started']:+.2f} s; failures opened from {min(opened):.2f} to "
             f"{max(opened):.2f} s; load average {os.getloadavg()[0]:.1f}; by step and error: {dict(kinds)}",
             "the first failures (opened s, ended s, step, error):"]
    lines += [f"  {failure}" for failure in result["failed"][:20]]
    for name, offset in log_from.items():
        with open(layout.log_dir / f"{name}.log", "rb") as log_file:
            log_file.seek(offset)
            text = log_file.read().decode(errors="replace")
        kept = [line for line in text.splitlines() if _worth_reporting(line)]
        lines.append(f"--- {name}.log since the load began ({len(kept)} lines kept):")
        lines += kept[:150]
    server_log = layout.log_dir / "pods" / "demo_web-0_web.log"
    if server_log.exists():   # the app's errors (a reset while it answered...), not its access lines
        problems = [line for line in server_log.read_text(errors="replace").splitlines()
                    if "Error" in line or "Exception" in line]
        lines.append(f"--- {server_log.name}: {len(problems)} error lines, the last ones:")
        lines += problems[-10:]
    metrics = subprocess.run(["ip", "netns", "exec", layout.node_netns(node), sys.executable, "-c",
                              "import urllib.request;print(urllib.request.urlopen("
                              "'http://127.0.0.1:15020/metrics', timeout=5).read().decode())"],
                             capture_output=True, text=True, timeout=30)
    lines.append("--- the new proxy's metrics:")
    lines += [line for line in metrics.stdout.splitlines() if line.startswith(RESTART_METRICS)] or [metrics.stderr]
    lines.append(f"--- the load's stderr: {load_stderr[-500:]}")
    return "\n".join(lines)


class RestartedProxy:
    """A node proxy restarted as an upgrade restarts it: a successor takes over through the
    handover and retires the old proxy, which drains its connections. A new process beside
    the old one; with SHOAL_TEST_CONTAINERS=1 a new container in the same pod
    (``LocalCluster.replace_proxy``, which returns once the old container is gone)."""

    def __init__(self, cluster, node: str) -> None:
        layout = cluster.layout
        container = cluster.container_of(next(c for c in cluster.node_components(node) if c.name == f"proxy-{node}"))
        self._container = container
        if container is not None:
            from shoal.local import podman
            self._old = podman.inspect(container)["Id"]
            self._new = cluster.replace_proxy(node)
            self.old_log = layout.log_dir / f"proxy-{node}.previous.log"
        else:
            self._old = (layout.run_dir / f"proxy-{node}.pid").read_text().strip()
            component = next(c for c in cluster.node_components(node) if c.name == f"proxy-{node}")
            self._new = str(cluster.start(component))
            self.old_log = layout.log_dir / f"proxy-{node}.log"   # both append to it

    def _running(self, which: str) -> bool:
        if self._container is None:
            return subprocess.run(["kill", "-0", which], capture_output=True).returncode == 0
        from shoal.local import podman
        return podman.exists(which) and podman.inspect(which)["State"]["Running"]

    def old_gone(self) -> bool:
        return not self._running(self._old)

    def new_running(self) -> bool:
        return self._running(self._new)


def test_node_proxy_restart_under_load_refuses_nothing(demo_cluster):
    layout = demo_cluster.layout
    web0 = pod_ip(layout, "demo/web-0")  # same node as client-0: both ends on node-1's proxy
    log_from = {name: (layout.log_dir / f"{name}.log").stat().st_size for name in ("proxy-node-1", "agent-node-1")}
    load = subprocess.Popen([sys.executable, "-m", "shoal", "exec", "demo/client-0", "--", sys.executable,
                             "-c", LOAD, web0, "8080", "200", "6"],
                            env={**os.environ, "SHOAL_CLUSTER": layout.name},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    restarted_at = time.time()
    restarted = RestartedProxy(demo_cluster, "node-1")   # the successor retires the old proxy itself
    out, err = load.communicate(timeout=120)
    assert out.strip(), err[-800:]
    result = json.loads(out.strip().splitlines()[-1])
    if result["failed"] or result["ok"] != 1200:
        pytest.fail(restart_failure_report(layout, "node-1", result, err, log_from, restarted_at), pytrace=False)
    eventually(restarted.old_gone, "the old proxy to exit")
    assert restarted.new_running()


# -- issue 18 (load) and issue 11 item 6 (graceful restart), on the real node proxies ------------

ECHO_PORT = 9100


def _start_echo(layout, pod: str) -> subprocess.Popen:
    namespace, name = pod.split("/")
    proc = subprocess.Popen(["ip", "netns", "exec", layout.pod_netns(namespace, name), sys.executable, "-c", ECHO_APP,
                             str(ECHO_PORT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "listening", proc.stderr.read() if proc.poll() is not None else ""
    return proc


def _hold(layout, client: str, ip: str, count: int, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shoal", "exec", client, "--", sys.executable, "-c", HOLD_CLIENT,
                             ip, str(ECHO_PORT), str(count), str(seconds)],
                            env={**os.environ, "SHOAL_CLUSTER": layout.name},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _summary(proc: subprocess.Popen, timeout: float = 240) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert out.strip(), err[-800:]
    return json.loads(out.strip().splitlines()[-1])


def test_1000_concurrent_connections_through_two_node_proxies_then_curl_works(demo_cluster):
    layout = demo_cluster.layout
    echo = _start_echo(layout, "demo/db-0")
    try:
        result = _summary(_hold(layout, "demo/client-0", pod_ip(layout, "demo/db-0"), 1000, 0))
        assert result["n_failed"] == 0 and result["ok"] == 1000, result
    finally:
        echo.terminate()
        echo.wait(10)
    node = pods(layout)["demo/client-0"]["spec"]["nodeName"]
    # 100 streams per HBONE connection: the pool opened (at least) ten, and nothing is left stuck.
    assert proxy_metric(layout, node, "shoal_proxy_rejected_total", reason="overloaded") == 0
    out = pod_exec(layout, "demo/client-0", "curl", "-s", "--max-time", "5", "http://web.demo:8080/",
                   check=False).stdout
    assert out.strip(), "curl web.demo after the burst got no answer"


def test_graceful_restart_keeps_50_live_connections_and_reports_the_drain(demo_cluster):
    layout = demo_cluster.layout
    node = pods(layout)["demo/client-0"]["spec"]["nodeName"]
    echo = _start_echo(layout, "demo/db-0")
    try:
        # 24 s: still held when the old proxy starts draining, also when its successor is a
        # container (podman, then the imports: about 10 s on this loaded machine).
        hold = _hold(layout, "demo/client-0", pod_ip(layout, "demo/db-0"), 50, 24)
        time.sleep(4)  # all 50 open and pinging
        restarted = RestartedProxy(demo_cluster, node)   # the successor retires the old proxy, which drains
        result = _summary(hold)
    finally:
        echo.terminate()
        echo.wait(10)
    assert result["ok"] == 50 and result["lost"] == [] and result["pings"] >= 50 * 15, result
    eventually(restarted.old_gone, "the old proxy to exit once its connections ended", timeout=60)
    log = restarted.old_log.read_text()
    # One report per proxy process: the proxy's, or each worker's (the DaemonSet runs two);
    # the latest of each, summed. The demo's own traffic may add a few connections.
    reports = {who: tuple(map(int, counts)) for who, *counts in
               re.findall(r"(worker \d+: )?drain: carried (\d+) of (\d+) connections .*; (\d+) cut", log)}
    assert reports, log[-2000:]
    carried, live, cut = (sum(column) for column in zip(*reports.values()))
    assert carried == live >= 50 and cut == 0, reports


# Sends SIZE random bytes, reads the echo concurrently, half-closes, reads to EOF; prints
# the JSON of what was sent and received (lengths, sha256, whether EOF came, the read
# error if any), also when the echo stalls (then what had arrived). Args: host port size.
TRANSFER = """
import hashlib, json, os, socket, sys, threading
payload = os.urandom(int(sys.argv[3]))
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
got = {"n": 0, "eof": False}
def read():
    h = hashlib.sha256()
    try:
        while data := c.recv(1 << 20):
            h.update(data)
            got["n"] += len(data)
        got["eof"] = True
    except OSError as exc:
        got["error"] = repr(exc)
    got["sha"] = h.hexdigest()
reader = threading.Thread(target=read, daemon=True)
reader.start()
c.sendall(payload)
c.shutdown(socket.SHUT_WR)
reader.join(60)
print(json.dumps({"sent": len(payload), "sent_sha": hashlib.sha256(payload).hexdigest(), **got}))
"""


def bypass_diagnostics(layout, node: str) -> str:
    """What node ``node``'s proxy says about its bypassed connections: its outcome counters
    and its last log lines about them (for a failure message)."""
    outcomes = {outcome: proxy_metric(layout, node, "shoal_proxy_bypass_connections_total", outcome=outcome)
                for outcome in ("joined", "relayed", "declined", "revoked", "broken")}
    log_file = layout.log_dir / f"proxy-{node}.log"
    lines = log_file.read_text(errors="replace").splitlines() if log_file.exists() else []
    return f"bypass outcomes {outcomes}; proxy log: " + "\n".join([line for line in lines if "bypass" in line][-15:])


def test_same_node_pods_are_joined_in_the_kernel_and_nothing_crosses_the_fabric(demo_cluster):
    """Issue 13's same-node bypass in the real cluster: the client's bytes to a pod of its
    own node are identical after a round trip, the node proxy joined the two sockets in
    the kernel (its metric), both reporters count the bytes, and no packet between the
    two pods crosses the fabric (cross-node stays HBONE on 15008: the test above)."""
    layout = demo_cluster.layout
    listing = pods(layout)
    node = listing["demo/client-0"]["spec"]["nodeName"]
    target = next(name for name, pod in listing.items() if name.startswith("demo/") and name != "demo/client-0"
                  and pod["spec"]["nodeName"] == node and pod["status"].get("podIP"))
    client_ip, target_ip = pod_ip(layout, "demo/client-0"), pod_ip(layout, target)
    echo = _start_echo(layout, target)
    joined = proxy_metric(layout, node, "shoal_proxy_bypass_connections_total", outcome="joined")
    received = proxy_metric(layout, node, "istio_tcp_received_bytes_total", reporter="destination",
                            source_principal="spiffe://cluster.local/ns/demo/sa/client")
    capture = subprocess.Popen(["ip", "netns", "exec", layout.control_netns, "tcpdump", "-i", "fabric0", "-nn",
                                "-c", "50", f"host {client_ip} and host {target_ip}"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, errors="replace")
    size = 8 * 1024 * 1024
    try:
        time.sleep(1)
        done = pod_exec(layout, "demo/client-0", sys.executable, "-c", TRANSFER, target_ip, str(ECHO_PORT), str(size),
                        timeout=120)
        time.sleep(1)
    finally:
        capture.terminate()
        dump = capture.communicate(timeout=10)[0]
        echo.terminate()
        echo.wait(10)
    assert done.stdout.strip(), done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    complete = result["eof"] and result["n"] == result["sent"] == size and result["sha"] == result["sent_sha"]
    assert complete, f"{result}; {bypass_diagnostics(layout, node)}"
    assert dump.strip() == "", dump[:2000]
    eventually(lambda: proxy_metric(layout, node, "shoal_proxy_bypass_connections_total", outcome="joined") > joined,
               "the node proxy joined the pair in the kernel")
    eventually(lambda: proxy_metric(layout, node, "istio_tcp_received_bytes_total", reporter="destination",
                                    source_principal="spiffe://cluster.local/ns/demo/sa/client") - received >= size,
               "the destination reporter counted the bytes")
