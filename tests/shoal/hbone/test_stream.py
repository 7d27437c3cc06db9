"""Both stream peers a session drives (the node proxy's ``StreamPeer``, the waypoint's
``HboneStream``) take a reset the same way: a CONNECT refused unprocessed (REFUSED_STREAM)
fails its answer with ``StreamRefused``, any other reset with a plain reset. A peer
without the ``unprocessed`` argument raised inside the session's event handling, which
then ended the whole connection as a protocol error."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from shoal.hbone.session import StreamPeer, StreamRefused
from shoal.hbone.stream import HboneStream


def _peers() -> list:
    record = SimpleNamespace(failed=lambda reason: None, reset=lambda reason: None)
    return [StreamPeer(record, lambda rec: None, tcp_is_client=True), HboneStream()]


@pytest.mark.parametrize("index", [0, 1], ids=["StreamPeer", "HboneStream"])
async def test_a_refused_connect_fails_its_answer_with_stream_refused(index):
    refused, reset = _peers()[index], _peers()[index]
    for peer in (refused, reset):
        peer.response = asyncio.get_running_loop().create_future()
    refused.on_stream_reset("stream reset by peer (code 7)", unprocessed=True)
    reset.on_stream_reset("stream reset by peer (code 8)")
    with pytest.raises(StreamRefused):
        await refused.response
    with pytest.raises(ConnectionResetError) as plain:
        await reset.response
    assert not isinstance(plain.value, StreamRefused)
