"""The door of an HBONE listener, shared by the node proxy and the waypoint (loopback, real
TLS, no root): the per-source cap at accept, failures that box a source and cut its
handshakes in progress, abuse that boxes it, and other sources let in meanwhile."""
from __future__ import annotations

import asyncio
import socket
import ssl

import pytest

from shoal.hbone.gatekeeper import PENALTY, Gatekeeper, handshake_failure, reset_socket
from shoal.hbone.handshakes import RECONNECT_LOOP, SOURCE_CAP, HandshakeLimits
from shoal.hbone.issuer import IdentityManager
from tests.devca import DevCA

pytestmark = pytest.mark.timeout(30)

SERVER_ID = "spiffe://cluster.local/ns/demo/sa/waypoint"
CLIENT_ID = "spiffe://cluster.local/ns/demo/sa/client"
ABUSER, FAILING, OTHER = "127.0.0.1", "127.0.0.3", "127.0.0.2"


class Session(asyncio.Protocol):
    """What TLS hands the connection to; its peer always verifies here."""
    transport: asyncio.BaseTransport | None = None
    verify_error: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport


class Door:
    """A listening socket served through a ``Gatekeeper``, as both daemons serve 15008."""

    def __init__(self, limits: HandshakeLimits, context: ssl.SSLContext) -> None:
        self.counted: list[str] = []
        self.boxed: list[tuple[str, float]] = []   # what a box below userspace is told
        self.keeper = Gatekeeper(limits, self.counted.append, on_boxed=lambda *boxing: self.boxed.append(boxing))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.context = context
        self.outcomes: dict[str, list[bool]] = {}
        self.tasks: set[asyncio.Task] = set()
        self.serving = asyncio.ensure_future(self._serve())

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, address = await loop.sock_accept(self.listener)
            refusal = self.keeper.refused_at_accept(address[0])
            if refusal is not None:
                reset_socket(conn)
                self.counted.append(refusal)
                continue
            conn.setblocking(False)
            task = asyncio.ensure_future(self._handshake(conn, address))
            self.tasks.add(task)

    async def _handshake(self, conn: socket.socket, address: tuple) -> None:
        ok = await self.keeper.handshake(conn, address, Session(), self.context)
        self.outcomes.setdefault(address[0], []).append(ok)

    async def dial(self, source: str) -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((source, 0))
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        return sock

    async def settle(self, until, what: str) -> None:
        for _ in range(100):
            if until():
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"{what}: counted {self.counted}, outcomes {self.outcomes}")

    async def close(self) -> None:
        self.serving.cancel()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(self.serving, *self.tasks, return_exceptions=True)
        self.listener.close()


async def ended(sock: socket.socket, within: float = 2.0) -> bool:
    """Whether the door ended ``sock`` (EOF or RST) within ``within`` seconds."""
    try:
        return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 1), within) == b""
    except asyncio.TimeoutError:
        return False
    except OSError:
        return True


async def test_a_source_over_its_cap_is_reset_at_accept_and_another_source_gets_in():
    ca = DevCA()
    identities = IdentityManager(ca.sign)
    server, client = await identities.get(SERVER_ID), await identities.get(CLIENT_ID)
    door = Door(HandshakeLimits(per_source=2, total=8), server.server_context)
    idle = [await door.dial(ABUSER) for _ in range(3)]   # never start TLS
    try:
        await door.settle(lambda: door.counted == [SOURCE_CAP], "the third is over the cap")
        assert await ended(idle[2], 1.0) and len(door.keeper.gate) == 2
        assert not await ended(idle[0], 0.2)              # the two within the cap still wait
        # Its next one is refused by the acceptor itself: no task, no TLS object for it.
        assert door.keeper.refused_at_accept(ABUSER) == SOURCE_CAP
        assert door.keeper.refused_at_accept(OTHER) is None
        # Another source completes its handshake meanwhile.
        _, writer = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", door.port, ssl=client.client_context, server_hostname="", local_addr=(OTHER, 0)), 5)
        await door.settle(lambda: door.outcomes.get(OTHER) == [True], "the other source's handshake")
        writer.close()
    finally:
        for sock in idle:
            sock.close()
        await door.close()


async def test_a_source_dialling_again_and_again_at_its_cap_is_boxed_and_its_holders_cut():
    """The handshake flood: holders that never finish keep the source at its cap, and every
    refusal at accept is followed by another dial. The cap alone never boxed it."""
    door = Door(HandshakeLimits(per_source=2, cap_refusals=3, penalty=30.0), ssl.create_default_context(
        ssl.Purpose.CLIENT_AUTH))
    holders = [await door.dial(ABUSER) for _ in range(2)]   # never start TLS
    try:
        for _ in range(3):
            refused = await door.dial(ABUSER)
            assert await ended(refused, 1.0)
            refused.close()
        await door.settle(lambda: door.boxed == [(ABUSER, 30.0)], "boxed for the loop")
        assert door.counted[:3] == [SOURCE_CAP] * 3
        assert all([await ended(sock, 1.0) for sock in holders])   # cut at once, not at the timeout
        await door.settle(lambda: door.counted.count(RECONNECT_LOOP) == 2, "its holders cut")
        assert door.keeper.refused_at_accept(ABUSER) == PENALTY
        assert door.keeper.refused_at_accept(OTHER) is None
    finally:
        for sock in holders:
            sock.close()
        await door.close()


async def test_a_source_failing_handshakes_is_boxed_its_handshakes_cut_and_refused_at_accept():
    ca = DevCA()
    server = await IdentityManager(ca.sign).get(SERVER_ID)
    door = Door(HandshakeLimits(failures=2, penalty=30.0), server.server_context)
    loop = asyncio.get_running_loop()
    waiting = await door.dial(FAILING)   # a handshake in progress, never finished
    try:
        for _ in range(2):                 # garbage instead of a ClientHello
            sock = await door.dial(FAILING)
            await loop.sock_sendall(sock, b"\x16\x03\x01\x02\x00" + bytes(512))
            assert await ended(sock)
            sock.close()
        await door.settle(lambda: door.counted.count("handshake_failures") == 1, "boxed")
        assert door.counted == ["tls_handshake", "tls_handshake", "handshake_failures"]
        assert door.boxed == [(FAILING, 30.0)]   # the node proxy drops its SYNs to 15008 as long
        assert await ended(waiting, 1.0)   # cut at once, not at the 10 s timeout
        later = await door.dial(FAILING)
        assert await ended(later, 1.0)
        await door.settle(lambda: door.counted[-1] == PENALTY, "refused at accept")
        later.close()
        assert door.keeper.refused_at_accept(OTHER) is None
    finally:
        waiting.close()
        await door.close()


async def test_only_abuse_boxes_a_source_not_a_malformed_frame():
    door = Door(HandshakeLimits(), ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
    try:
        door.keeper.abused(OTHER, "h2_protocol")
        assert door.keeper.refused_at_accept(OTHER) is None and door.boxed == []
        door.keeper.abused(OTHER, "ping_flood")
        assert door.keeper.refused_at_accept(OTHER) == PENALTY
        door.keeper.abused(OTHER, "ping_flood")   # a repeat: the wait doubles, below userspace too
        assert door.boxed == [(OTHER, 2.0), (OTHER, 4.0)]
        assert door.keeper.refused_at_accept(ABUSER) is None
    finally:
        await door.close()


def test_failures_are_named_by_what_the_peer_did():
    assert handshake_failure(ssl.SSLCertVerificationError("bad"), timed_out=False) == "untrusted_certificate"
    assert handshake_failure(ssl.SSLError("wrong version"), timed_out=False) == "tls_handshake"
    assert handshake_failure(asyncio.TimeoutError(), timed_out=True) == "handshake_timeout"
    no_certificate = ssl.SSLError()
    no_certificate.reason = "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert handshake_failure(no_certificate, timed_out=False) == "untrusted_certificate"
