"""The waypoint as a whole: wiring, config from the stream's objects, and the real process."""
import asyncio
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import aiohttp
import pytest
from aiohttp import web

from shoal.waypoint.app import WaypointApp, validate_resource
from shoal.waypoint.config import WaypointConfig
from shoal.xds import model as m
from shoal.xds.state import ConfigState

from .conftest import make_backend_app, route, traffic_policy

pytestmark = pytest.mark.timeout(60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kube(obj) -> m.KubeObject:
    meta = obj["metadata"]
    return m.KubeObject(obj["kind"], meta["namespace"], meta["name"], json.dumps(obj))


async def start_backend(name):
    runner = web.AppRunner(make_backend_app(name, []), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


def test_validator_nacks_bad_routes_only():
    good = kube(route([{"backendRefs": [{"name": "web", "port": 80}]}]))
    validate_resource(good)
    bad = kube(route([{"matches": [{"path": {"type": "Nope", "value": "/"}}]}]))
    with pytest.raises(ValueError, match="path.type"):
        validate_resource(bad)
    validate_resource(m.Waypoint("w", "demo", "10.244.1.9", "w", "spiffe://x"))


async def test_routes_follow_the_config_state_without_restart():
    v1, p1 = await start_backend("web-v1")
    v2, p2 = await start_backend("web-v2")
    state = ConfigState()
    state.apply(m.ConfigDelta("1", upserted=(
        m.Workload("web-v1-0", "web-v1-0", "demo", "web", "node-1", "127.0.0.1", 1, "spiffe://cluster.local/ns/demo/sa/web",
                   meshed=False, protocol="TCP"),
        m.Service("web", "demo", "10.96.0.10", (m.ServicePort("http", 80, p1),), ("web-v1-0",)),
        m.Service("web-v2", "demo", "10.96.0.11", (m.ServicePort("http", 80, p2),), ("web-v1-0",)),
    )))
    port = free_port()
    config = WaypointConfig(name="waypoint", namespace="demo", plaintext_address=("127.0.0.1", port),
                            metrics_port=0, ready_port=0, access_log="", emit_flows=False)
    app = WaypointApp(config, state=state)
    await app.start()
    try:
        async with aiohttp.ClientSession() as session:
            async def backend():
                async with session.get(f"http://127.0.0.1:{port}/", headers={"host": "web.demo:80"}) as resp:
                    body = await resp.read()
                    return (json.loads(body)["backend"] if resp.status == 200 else body.decode().strip()), resp.status
            assert await backend() == ("web-v1", 200)
            # An HTTPRoute arrives on the stream: the next request follows it.
            to_v2 = route([{"backendRefs": [{"name": "web-v2", "port": 80}]}])
            state.apply(m.ConfigDelta("2", upserted=(kube(to_v2),)))
            assert await backend() == ("web-v2", 200)
            # A broken object is ignored (and counted); the good one stays.
            broken = route([{"matches": [{"path": {"type": "Nope"}}]}], name="broken")
            state.apply(m.ConfigDelta("3", upserted=(kube(broken),)))
            assert await backend() == ("web-v2", 200)
            assert app.telemetry.metrics.config_rejected.labels(kind="HTTPRoute").value >= 1
            # Rate limit policy added, then the route removed.
            state.apply(m.ConfigDelta("4", upserted=(kube(traffic_policy({"rateLimit": {"maxTokens": 1, "fillInterval": "1h"}})),),
                                      removed=("object/HTTPRoute/demo/r",)))
            assert await backend() == ("web-v1", 200)
            assert (await backend())[1] == 429
    finally:
        await app.stop()
        await v1.cleanup()
        await v2.cleanup()


async def test_the_real_process_serves_metrics_and_stops_on_sigterm(tmp_path):
    runner, backend_port = await start_backend("web")
    routes = tmp_path / "routes.yaml"
    routes.write_text(json.dumps(route([{"filters": [{"type": "ResponseHeaderModifier",
                                                      "responseHeaderModifier": {"set": [{"name": "x-wp", "value": "1"}]}}],
                                         "backendRefs": [{"name": "web", "port": 80}]}])))
    port, metrics_port, ready_port = free_port(), free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "shoal.waypoint", "--name", "waypoint", "--namespace", "demo",
                             "--plaintext", f"127.0.0.1:{port}", "--static-service", f"demo/web=127.0.0.1:{backend_port}",
                             "--routes-file", str(routes), "--metrics-port", str(metrics_port),
                             "--ready-port", str(ready_port), "--no-flows"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "SHOAL_CONTROLLER": ""})
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ready_port}/healthz/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "waypoint never became ready"
                await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/x", headers={"host": "web"}) as resp:
                assert resp.status == 200 and resp.headers["x-wp"] == "1"
            async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                text = await resp.text()
        assert 'istio_requests_total{' in text and 'response_code="200"' in text
        assert "istio_request_duration_milliseconds_bucket" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        await runner.cleanup()
    assert proc.returncode == 0, err.decode()
    line = json.loads(out.decode().splitlines()[0])  # the JSON access log on stdout
    assert line["path"] == "/x" and line["response_code"] == 200


async def test_sigterm_drains_requests_in_flight_and_turns_unready(tmp_path):
    """A waypoint told to stop (its routes already moved away) finishes what it is serving."""
    runner, backend_port = await start_backend("web")
    port, ready_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "shoal.waypoint", "--name", "waypoint", "--namespace", "demo",
                             "--plaintext", f"127.0.0.1:{port}", "--static-service", f"demo/web=127.0.0.1:{backend_port}",
                             "--metrics-port", "0", "--ready-port", str(ready_port), "--no-flows",
                             "--access-log", "", "--drain-seconds", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "SHOAL_CONTROLLER": ""})

    def ready_status() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ready_port}/healthz/ready", timeout=1) as r:
                return r.status
        except urllib.error.HTTPError as err:
            return err.code
        except OSError:
            return 0

    try:
        deadline = time.monotonic() + 20
        while ready_status() != 200:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "waypoint never became ready"
            await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as session:
            slow = asyncio.ensure_future(session.get(f"http://127.0.0.1:{port}/slow?delay_ms=1500",
                                                     headers={"host": "web"}))
            await asyncio.sleep(0.4)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            assert await asyncio.to_thread(ready_status) == 503   # draining: not ready
            with pytest.raises(OSError):                        # no new connections
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            resp = await asyncio.wait_for(slow, 5)
            assert resp.status == 200 and (await resp.text())
        out, err = await asyncio.to_thread(proc.communicate, timeout=10)
        assert proc.returncode == 0, err.decode()
        assert b"drained" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        await runner.cleanup()


def test_bad_flags_are_rejected():
    with pytest.raises(SystemExit):
        WaypointConfig.from_args(["--name", "w"], env={})
    with pytest.raises(SystemExit):
        WaypointConfig.from_args(["--name", "w", "--namespace", "d", "--static-service", "nonsense"], env={})
    c = WaypointConfig.from_args(["--name", "w", "--namespace", "d", "--static-service", "d/web=10.0.0.1:80,10.0.0.2:81"], env={})
    assert c.static_services == (("d", "web", (("10.0.0.1", 80), ("10.0.0.2", 81))),)
    assert c.spiffe_id == "spiffe://cluster.local/ns/d/sa/w"


def registry_total(registry, name: str, **labels) -> float:
    return sum(s.value for f in registry.collect() for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def test_the_handshake_timeout_flag_cuts_a_silent_client_on_the_hbone_listener():
    """``--handshake-timeout`` (the node proxy's flag, shoal.hbone.handshakes) reaches the
    waypoint's 15008: a client that connects and sends no ClientHello is cut after it, and
    counted. Before, the waypoint had no such flag and held it for a fixed 10 s."""
    from tests.devca import DevCA

    port = free_port()
    config = WaypointConfig.from_args([
        "--name", "waypoint", "--namespace", "demo", "--hbone", f"127.0.0.1:{port}", "--metrics-port", "0",
        "--ready-port", "0", "--no-flows", "--access-log", "", "--handshake-timeout", "0.5"], env={})
    app = WaypointApp(config, signer=DevCA().sign)
    await app.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        try:
            answer = await asyncio.wait_for(reader.read(1), 8)   # b"": closed without a byte
        except ConnectionResetError:
            answer = b""
        took = time.monotonic() - started
        writer.close()
        assert answer == b"" and 0.45 <= took < 8, (answer, took)   # the flag's 0.5 s, not the default 10 s
        assert registry_total(app.registry, "shoal_waypoint_rejected_requests_total",
                              reason="handshake_timeout", status="408") == 1
    finally:
        await app.stop()


async def test_a_handshake_flood_from_one_source_costs_another_client_nothing(tmp_path):
    """perf's h2flood ``handshake`` attacker (a real process) on the waypoint's HBONE
    listener, from one address, scaled down, against a waypoint built from its flags (caps
    scaled down too): first never-finished ClientHellos, then garbage and an untrusted
    certificate. Another client, from another address, opens HBONE sessions throughout and
    gets every answer; the attacker is capped per source, then boxed for its failures and
    refused at accept. Before the waypoint had the node proxy's door, nothing capped the
    idle handshakes and nothing boxed a failing source."""
    from shoal.hbone.issuer import IdentityManager
    from shoal.perf.connscripts import HANDSHAKE_FLOOD_CLIENT
    from shoal.perf.scenarios.h2flood import untrusted_credentials
    from tests.devca import DevCA

    from .test_hbone import VIP, hbone_client, http_over, open_tunnel

    runner, backend_port = await start_backend("web")
    port = free_port()
    config = WaypointConfig.from_args([
        "--name", "waypoint", "--namespace", "demo", "--hbone", f"127.0.0.1:{port}",
        "--static-service", f"demo/web=127.0.0.1:{backend_port}", "--metrics-port", "0", "--ready-port", "0",
        "--no-flows", "--access-log", "", "--max-handshakes-per-source", "20", "--max-handshakes", "64",
        "--handshake-failures", "6", "--abuser-penalty", "30",
        "--handshake-cap-refusals", "1000000"], env={})   # the cap's loop rule: test_gatekeeper
    ca = DevCA()
    app = WaypointApp(config, signer=ca.sign)
    await app.start()
    client_ids = IdentityManager(ca.sign)
    untrusted = untrusted_credentials()
    rejected = functools.partial(registry_total, app.registry, "shoal_waypoint_rejected_requests_total")
    attackers = []

    async def attack(idle: int, loops: int, seconds: float) -> dict:
        """The attacker from 127.0.0.1 for ``seconds``, while the other client (127.0.0.2)
        opens a new HBONE session and asks one request every 0.2 s: its summary."""
        attacker = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HANDSHAKE_FLOOD_CLIENT, "127.0.0.1", str(port), str(seconds), str(idle),
            str(loops), *untrusted, stdout=asyncio.subprocess.PIPE)
        attackers.append(attacker)
        await asyncio.sleep(0.5)
        answers = []
        for _ in range(8):
            session = await asyncio.wait_for(hbone_client(client_ids, port, source="127.0.0.2"), 10)
            stream, status = await open_tunnel(session, VIP, 80)
            answers.append((status, (await http_over(stream, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n"))[:12]))
            stream.close()
            session.close()
            await asyncio.sleep(0.2)
        assert answers == [(200, b"HTTP/1.1 200")] * 8
        out, _ = await asyncio.wait_for(attacker.communicate(), 60)
        return json.loads(out.decode().strip().splitlines()[-1])

    try:
        idle = await attack(idle=100, loops=0, seconds=3)
        assert idle["idle_opened"] >= 100
        assert rejected(reason="handshake_source_cap", status="429") >= 80   # 100 idle against a cap of 20
        failing = await attack(idle=0, loops=2, seconds=3)
        assert failing["garbage"] >= 1 and failing["untrusted_accepted"] == 0
        assert rejected(reason="tls_handshake") + rejected(reason="untrusted_certificate") >= 6
        assert rejected(reason="abuser_penalty", status="429") >= 1   # boxed, then refused at accept
        gate = app._servers[0].gatekeeper.gate
        for _ in range(50):   # the attacker's last connections close as it exits
            if len(gate) == 0:
                break
            await asyncio.sleep(0.05)
        assert len(gate) == 0   # nothing of it left in progress
    finally:
        for attacker in attackers:
            if attacker.returncode is None:
                attacker.kill()
                await attacker.wait()
        await app.stop()
        await runner.cleanup()
