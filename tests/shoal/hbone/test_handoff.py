"""A socket handed to the event loop never closes a number that is no longer its own
(shoal/hbone/handoff.py): real sockets, on uvloop (the data path's loop) and the stock loop."""
from __future__ import annotations

import asyncio
import gc
import os
import select
import socket
import ssl
import struct

import pytest
import uvloop

from shoal.hbone.handoff import create_connection_on

RUNNERS = {"uvloop": uvloop.run, "asyncio": asyncio.run}


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def reset_by_peer() -> socket.socket:
    """A connected, non-blocking client socket whose peer has already reset it (what a peer
    proxy shedding the connections it queued too long does): the ClientHello will fail."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        sock = socket.socket()
        sock.connect(listener.getsockname())
        conn, _ = listener.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
    poller = select.poll()
    poller.register(sock, select.POLLERR | select.POLLHUP)
    assert poller.poll(2000), "the reset did not arrive"
    sock.setblocking(False)
    return sock


def sockets_until(number: int) -> list[socket.socket]:
    """New sockets, the last of them at ``number`` (free again): the lowest free numbers go first."""
    made = [socket.socket()]
    while made[-1].fileno() != number and len(made) < 256:
        made.append(socket.socket())
    return made


def survives(other: socket.socket) -> bool:
    identity = os.fstat(other.fileno()).st_ino
    gc.collect()
    try:
        return os.fstat(other.fileno()).st_ino == identity
    except OSError:
        return False


@pytest.mark.parametrize("loop", RUNNERS)
def test_a_peer_reset_before_the_client_hello_closes_no_one_elses_socket(loop):
    """uvloop attaches the socket to a transport already closed (its fd with it): freed,
    the socket closed the next connection at that number. Now it owns nothing."""
    async def scenario() -> None:
        sock = reset_by_peer()
        number = sock.fileno()
        with pytest.raises(OSError):
            await create_connection_on(asyncio.get_running_loop(), asyncio.Protocol, sock, ssl=client_context(),
                                       server_hostname="")
        await asyncio.sleep(0.01)   # every close the loop queued has run
        assert sock.fileno() == -1
        others = sockets_until(number)   # one takes the failed socket's number
        try:
            [other] = [s for s in others if s.fileno() == number]
            del sock
            assert survives(other), "freeing the failed socket closed another one"
        finally:
            for s in others:
                s.close()

    RUNNERS[loop](scenario())


@pytest.mark.parametrize("loop", RUNNERS)
def test_a_socket_the_loop_never_took_is_closed(loop):
    async def scenario() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)   # refused before the loop takes it
        number = sock.fileno()
        with pytest.raises(ValueError):
            await create_connection_on(asyncio.get_running_loop(), asyncio.Protocol, sock)
        assert sock.fileno() == -1
        with pytest.raises(OSError):
            os.fstat(number)   # closed, not leaked

    RUNNERS[loop](scenario())


@pytest.mark.parametrize("loop", RUNNERS)
def test_a_connection_made_is_the_transports_to_close(loop):
    async def scenario() -> None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            sock = socket.socket()
            sock.connect(listener.getsockname())
            sock.setblocking(False)
            identity = os.fstat(sock.fileno()).st_ino
            transport, _ = await create_connection_on(asyncio.get_running_loop(), asyncio.Protocol, sock)
            assert os.fstat(transport.get_extra_info("socket").fileno()).st_ino == identity
            transport.close()
            await asyncio.sleep(0.01)
            assert sock.fileno() == -1   # the transport closed it and let go of it

    RUNNERS[loop](scenario())
