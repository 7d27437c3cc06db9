"""The door of an HBONE listener (15008), for the node proxy and the waypoint alike: who
is refused at accept, and the TLS handshake under the gate (issue 18).

A thin asyncio driver over the two pure tables, one of each per worker: the
``HandshakeGate`` (handshakes in progress per source and per worker, sources that keep
failing them) and the ``PenaltyBox`` (sources cut off for abuse, refused at accept for a
while). The daemon gives the listener's accepted sockets, its metric (``count``, one call
per refusal, by reason) and its log limiter; every refusal is counted, and logged a line
a second per reason at most, so a flood of handshakes never becomes a flood of log lines.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import Callable, Hashable

from shoal.hbone.framing import ABUSE_REASONS
from shoal.hbone.handshakes import RECONNECT_LOOP, SOURCE_CAP, HandshakeLimits
from shoal.hbone.session import LINGER_RESET, HboneSession
from shoal.ratelog import LogLimiter, held_note

log = logging.getLogger(__name__)

# Refused at accept, before anything else: the source is in the penalty box.
PENALTY = "abuser_penalty"

# Connections an acceptor takes per wake-up of its listening socket, as asyncio's own servers
# bound theirs: a reconnect-loop flood keeps the accept queue full, and draining it to empty in
# one callback holds every established connection's reads back meanwhile. What is left is
# taken on the next loop turn (the listener stays readable).
ACCEPTS_PER_WAKEUP = 64

# Handshake refusals that are the source's doing, which its penalty counts: what it sent
# was not TLS 1.3 with h2, or its certificate is not a mesh identity. Not a timeout: that
# can be our own slowness (a proxy short of CPU), and idle holders are bounded by the
# per-source cap and the timeout already; nor the gate's own cuts and caps, which a busy
# but well-behaved source can meet.
HANDSHAKE_FAILURES = frozenset({"tls_handshake", "untrusted_certificate", "peer_identity"})


def reset_socket(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): a refused client learns it at once, and we keep no
    socket in FIN-WAIT for it."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    sock.close()


def handshake_failure(exc: BaseException, timed_out: bool) -> str:
    """The metric reason of a failed handshake: the peer's certificate was not one the mesh
    CA issued (or none), it did not finish in time, or it did not speak TLS 1.3 with h2."""
    if timed_out:
        return "handshake_timeout"
    if isinstance(exc, ssl.SSLCertVerificationError) or \
            getattr(exc, "reason", None) in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_VERIFY_FAILED"):
        return "untrusted_certificate"
    return "tls_handshake"


class Gatekeeper:
    """One worker's door of 15008: the penalty box at accept, the handshake gate around TLS."""

    def __init__(self, limits: HandshakeLimits, count: Callable[[str], None],
                 log_limiter: LogLimiter | None = None,
                 on_boxed: Callable[[str, float], object] | None = None) -> None:
        """``on_boxed(source, seconds)``: told of every boxing, for a box below userspace
        (the node proxy's: ``shoal.datapath.penaltybox``, SYNs dropped at tc)."""
        self.gate = limits.gate()
        self.box = limits.penalty_box()
        self.timeout = limits.timeout
        self._count = count
        self._log_limiter = log_limiter or LogLimiter()
        self._on_boxed = on_boxed

    def refused_at_accept(self, source: str) -> str | None:
        """A refusal reason for a new connection from ``source`` (the caller resets it and
        counts the reason), or None: the source is in the penalty box, or holds its share of
        handshakes already. Both refused for the cost of the accept alone: an idle-handshake
        flood reconnects thousands of times a second, and a task with a TLS object for each
        (refused at ``admit`` a moment later) took half a core and stalled other clients.
        A refusal at the cap is also a strike: ``cap_refusals`` of them box the source."""
        if self.box.refuses(source, asyncio.get_running_loop().time()):
            return PENALTY
        if not self.gate.at_cap(source):
            return None
        self._refused_at_cap(source)
        return SOURCE_CAP

    async def handshake(self, conn: socket.socket, peer: tuple, session: HboneSession,
                        context: ssl.SSLContext) -> bool:
        """TLS on the accepted ``conn`` (its protocol ``session``), admitted by the gate
        first and cut after the limits' ``timeout``. True: the session is up and its peer verified. False: refused, counted,
        logged and closed (the source penalised when it was its doing)."""
        loop = asyncio.get_running_loop()
        refusal, victims = self.gate.admit(peer[0], conn)   # before any cost of ours
        if refusal is not None:
            self._refuse(conn, peer, refusal, None, reset=True)
            if refusal == SOURCE_CAP:
                self._refused_at_cap(peer[0])
            return False
        _cut(victims)
        started, timeout = loop.time(), self.timeout
        try:
            await loop.connect_accepted_socket(lambda: session, conn, ssl=context, ssl_handshake_timeout=timeout)
        except (ssl.SSLError, OSError, asyncio.TimeoutError) as exc:
            reason = self.gate.finish(peer[0], conn) or handshake_failure(
                exc, loop.time() - started >= timeout * 0.99)
            self._refuse(conn, peer, reason, exc)
            return False
        except BaseException:
            self.gate.finish(peer[0], conn)
            raise
        cut = self.gate.finish(peer[0], conn)
        if cut is not None and session.transport is not None:
            session.transport.abort()   # completed as the gate cut it: its socket is shut already
        if session.verify_error is not None or cut is not None:
            self._refuse(conn, peer, cut or "peer_identity", session.verify_error)
            return False
        return True

    def abused(self, source: str, reason: str) -> None:
        """A session of ``source`` was refused for ``reason``: an abuse (a spent HTTP/2
        budget, ``framing.ABUSE_REASONS``) puts the source in the penalty box."""
        if reason in ABUSE_REASONS:
            self._punish(source, reason)

    def _refused_at_cap(self, source: str) -> None:
        """A refusal at the source's cap is a strike: a reconnect loop (holders that never
        finish, each back as the timeout ends it) is boxed, its handshakes cut."""
        in_progress = self.gate.refused_at_cap(source, asyncio.get_running_loop().time())
        if in_progress is not None:
            self._punish(source, RECONNECT_LOOP)
            _cut(in_progress)

    def _punish(self, source: str, reason: str) -> None:
        seconds = self.box.punish(source, asyncio.get_running_loop().time())
        if self._on_boxed is not None:
            self._on_boxed(source, seconds)
        held = self._log_limiter.allow(PENALTY)
        if held is not None:
            log.warning("hbone: %s cut off for %s; its new connections are refused for %.0f s%s",
                        source, reason, seconds, held_note(held))

    def _refuse(self, conn: socket.socket, peer: tuple, reason: str, exc: BaseException | None,
                reset: bool = False) -> None:
        """Counted by reason; logged a line a second per reason; a source failing too many
        handshakes is boxed and its other handshakes in progress cut."""
        self._count(reason)
        held = self._log_limiter.allow(("handshake", reason))
        if held is not None:
            log.warning("hbone: refused %s:%s: %s (%s)%s", peer[0], peer[1], reason,
                        (exc or type(exc).__name__) if exc is not None else "at accept", held_note(held))
        if reset:
            reset_socket(conn)
        else:
            conn.close()
        if reason in HANDSHAKE_FAILURES:
            in_progress = self.gate.failed(peer[0], asyncio.get_running_loop().time())
            if in_progress is not None:
                self._punish(peer[0], "handshake_failures")
                _cut(in_progress)


def _cut(victims: list[Hashable]) -> None:
    """End handshakes the gate took back: their reads see EOF at once and their handler
    reports the gate's reason (the socket stays the handler's to close)."""
    for victim in victims:
        if isinstance(victim, socket.socket):
            with contextlib.suppress(OSError):
                victim.shutdown(socket.SHUT_RDWR)
