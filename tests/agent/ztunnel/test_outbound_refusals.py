"""What the listeners say under a burst (issue 18): a peer that refuses every outbound
stream costs a line a second, not a line per connection (once ~5,000 lines in 5 s from
the proxy's one thread), every refusal and retry still counted; an error that is no
network failure (the FileExistsError of the 10,000 burst) is logged with its traceback,
once, and counted as ours; inbound, a peer asking for what a pod does not expose is
refused and counted each time, logged a line a second."""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from shoal.agent.ztunnel.admission import Admission
from shoal.agent.ztunnel.context import ServedPod
from shoal.agent.ztunnel.outbound import Route, _tunnel, handle_outbound
from shoal.agent.ztunnel.telemetry import ConnectionRecord, ProxyMetrics
from shoal.hbone.session import StreamRefused
from shoal.ratelog import LogLimiter
from shoal.xds.model import ConfigDelta
from shoal.xds.state import ConfigState
from shoal.zds import PodInfo
from tests.agent.ztunnel.proxybed import workload

pytestmark = pytest.mark.timeout(30)

CONNECTIONS = 300
CLIENT = workload("client-0", "10.244.1.2", "client")
SERVER = workload("server-0", "10.244.2.2", "server")


class RefusingPeerSession:
    """An HBONE connection whose peer refuses every stream unprocessed (REFUSED_STREAM)."""

    def __init__(self):
        self.last_progress = time.monotonic()
        self.opened = 0

    def open_stream(self, peer, host, port, forwarded_for, traceparent, src_port) -> None:
        self.opened += 1
        peer.stream_id = 2 * self.opened - 1
        peer.response.set_exception(StreamRefused("stream reset by peer (code 7)"))

    def stream_done(self, stream_id: int) -> None:
        pass

    def probe(self) -> None:
        pass


def context(session_of) -> SimpleNamespace:
    state = ConfigState()
    state.apply(ConfigDelta("1", upserted=(CLIENT, SERVER)))
    closed: list[ConnectionRecord] = []
    synced = asyncio.Event()
    synced.set()
    return SimpleNamespace(
        pool=SimpleNamespace(session=session_of), admission=Admission(8192, 100_000, live=lambda: 0),
        config=SimpleNamespace(connect_timeout=5.0, answer_limit=60.0), metrics=ProxyMetrics(CollectorRegistry()),
        hbone_log_limiter=LogLimiter(clock=lambda: 0.0),   # the whole test is one period
        telemetry=SimpleNamespace(closed=closed.append, opened=lambda rec: None), closed=closed,
        origdst=SimpleNamespace(lookup=lambda conn: (SERVER.ip, 9100)), config_synced=synced, state=state,
        served_pods={}, bypass=None)


def pod() -> ServedPod:
    info = PodInfo(CLIENT.uid, CLIENT.namespace, CLIENT.name, CLIENT.ip, CLIENT.service_account)
    return ServedPod(info, netns=None, spiffe_id=CLIENT.spiffe_id)   # type: ignore[arg-type]  # never dialled


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """An app's connection and the proxy's accepted end of it, over loopback."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        app_end = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    ours.setblocking(False)
    return app_end, ours


def count(metrics: ProxyMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def lines(caplog, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


async def test_a_peer_refusing_a_burst_costs_a_line_a_second_and_every_refusal_is_counted(caplog):
    session = RefusingPeerSession()

    async def session_of(key, dial):
        return session

    ctx = context(session_of)
    route = Route("hbone", SERVER.ip, 15008, SERVER.ip, 9100, SERVER.spiffe_id, SERVER)
    with caplog.at_level(logging.INFO, logger="shoal.agent.ztunnel.outbound"):
        for i in range(CONNECTIONS):
            app_end, ours = tcp_pair()
            rec = ConnectionRecord("source", CLIENT.ip, 40000 + i, SERVER.ip, 9100)
            await _tunnel(ctx, pod(), ours, route, rec)
            app_end.close()
    assert session.opened == 2 * CONNECTIONS   # each tried twice
    assert len(ctx.closed) == CONNECTIONS and all("refused by the peer proxy" in r.error for r in ctx.closed)
    assert count(ctx.metrics, "shoal_proxy_outbound_retries_total", reason="stream_refused") == CONNECTIONS
    assert count(ctx.metrics, "shoal_proxy_rejected_total", listener="outbound", reason="peer_refused") == CONNECTIONS
    assert len(lines(caplog, "stream lost before its answer")) == 1
    assert len(lines(caplog, "refused the stream twice")) == 1


async def test_a_failed_dial_retried_by_a_burst_is_one_line(caplog):
    async def session_of(key, dial):
        raise ConnectionResetError(104, "Connection reset by peer")

    ctx = context(session_of)
    with caplog.at_level(logging.INFO, logger="shoal.agent.ztunnel.outbound"):
        for _ in range(CONNECTIONS):
            app_end, ours = tcp_pair()
            await handle_outbound(ctx, pod(), ours)
            app_end.close()
    assert count(ctx.metrics, "shoal_proxy_outbound_retries_total", reason="dial_failed") == CONNECTIONS
    assert count(ctx.metrics, "shoal_proxy_rejected_total", listener="outbound", reason="upstream_connect") \
        == CONNECTIONS
    assert len(lines(caplog, "HBONE dial to")) == 1
    failed = lines(caplog, "failed: ConnectionResetError")
    assert len(failed) == 1 and failed[0].exc_info is None   # the network's doing: no traceback


async def test_an_error_that_is_no_network_failure_is_logged_with_its_traceback_once_and_counted(caplog):
    async def session_of(key, dial):
        raise FileExistsError(17, "File exists")

    ctx = context(session_of)
    with caplog.at_level(logging.INFO, logger="shoal.agent.ztunnel.outbound"):
        for _ in range(20):
            app_end, ours = tcp_pair()
            await handle_outbound(ctx, pod(), ours)
            with pytest.raises(ConnectionResetError):   # the app is told at once
                app_end.recv(1)
            app_end.close()
    assert count(ctx.metrics, "shoal_proxy_rejected_total", listener="outbound", reason="internal_error") == 20
    assert [r.error for r in ctx.closed] == ["FileExistsError: [Errno 17] File exists"] * 20
    [line] = lines(caplog, "FileExistsError")
    assert line.levelno == logging.ERROR and line.exc_info is not None and "Traceback" in caplog.text


class RefusalRecordingSession:
    """The HBONE connection a stream came on: who the peer is, what it was answered."""

    peer_identity = CLIENT.spiffe_id

    def __init__(self):
        self.refused: list[tuple[int, int | None]] = []

    def refuse_stream(self, stream_id: int, status: int | None) -> None:
        self.refused.append((stream_id, status))


async def test_a_peer_asking_for_what_a_pod_does_not_expose_costs_a_line_a_second(caplog):
    """Any mesh identity can send thousands of CONNECTs to a loopback address, or claim a
    forwarded address: each is refused (or ignored) and counted, a line a second per reason."""
    from shoal.agent.ztunnel.inbound import _serve_stream
    from shoal.hbone.framing import TunnelRequested

    ctx = context(None)
    server = ServedPod(PodInfo(SERVER.uid, SERVER.namespace, SERVER.name, SERVER.ip, SERVER.service_account),
                       netns=None, spiffe_id=SERVER.spiffe_id)   # type: ignore[arg-type]  # nothing dialled
    session = RefusalRecordingSession()
    with caplog.at_level(logging.INFO, logger="shoal.agent.ztunnel.inbound"):
        for i in range(CONNECTIONS):
            ev = TunnelRequested(2 * i + 1, "127.0.0.1", 22, forwarded_for="192.0.2.9", traceparent=None)
            await _serve_stream(ctx, server, session, ev, CLIENT.ip)   # type: ignore[arg-type]
    assert len(session.refused) == CONNECTIONS and {status for _, status in session.refused} == {400}
    assert count(ctx.metrics, "shoal_proxy_rejected_total", listener="hbone", reason="loopback_destination") \
        == CONNECTIONS
    assert count(ctx.metrics, "shoal_proxy_rejected_total", listener="hbone", reason="forwarded_ignored") \
        == CONNECTIONS
    assert len(lines(caplog, "loopback_destination")) == 1
    assert len(lines(caplog, "claimed forwarded")) == 1
