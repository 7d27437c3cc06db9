"""The supervisor-to-worker feed codec (``agent/ztunnel/feed.py``), without sockets: every
message round-trips, byte by byte as it may arrive, and every broken frame is refused."""
from __future__ import annotations

import json
import random

import pytest

from shoal.agent.ztunnel import feed
from shoal.xds import model as m

WEB = m.Workload(uid="u-web", name="web-0", namespace="demo", service_account="web", node="node-1",
                 ip="10.244.1.5", identity=7, spiffe_id="spiffe://cluster.local/ns/demo/sa/web", meshed=True,
                 labels=m.Labels({"app": "web"}), ips=("10.244.1.5", "fd00:10:244:1::5"))
SERVICE = m.Service(name="web", namespace="demo", vip="10.96.0.10",
                    ports=(m.ServicePort("http", 8080, 8080),), endpoints=("u-web",))
POLICY = m.Authorization(name="deny", namespace="demo", action="DENY", selector=m.Labels({"app": "db"}),
                         rules=(m.Rule(sources=(m.Source(principals=("cluster.local/ns/demo/sa/client",)),),
                                       operations=(m.Operation(ports=(7000,)),)),))
GRANT = feed.SvidGrant("spiffe://cluster.local/ns/demo/sa/web", b"-----BEGIN CERTIFICATE-----\nA\n",
                       b"-----BEGIN PRIVATE KEY-----\nK\n", b"-----BEGIN CERTIFICATE-----\nR\n",
                       1_700_000_000.0, 1_700_003_600.5)

MESSAGES = [
    feed.ConfigUpdate(m.ConfigDelta(version="12", upserted=(WEB, SERVICE, POLICY)), snapshot=True),
    feed.ConfigUpdate(m.ConfigDelta(version="13", upserted=(WEB,), removed=("service/demo/web",))),
    feed.ConfigUpdate(m.ConfigDelta(version="14"), snapshot=True),   # an empty mesh is a state too
    GRANT,
    feed.SvidPending("spiffe://cluster.local/ns/demo/sa/db"),
    feed.SvidDropped("spiffe://cluster.local/ns/demo/sa/web"),
]


def same(a: feed.FeedMessage, b: feed.FeedMessage) -> bool:
    if isinstance(a, feed.ConfigUpdate) and isinstance(b, feed.ConfigUpdate):
        return (a.snapshot, a.delta.version, a.delta.upserted, a.delta.removed) == \
               (b.snapshot, b.delta.version, b.delta.upserted, b.delta.removed)
    return a == b


def test_every_message_round_trips_whole_and_in_any_split():
    stream = b"".join(feed.encode(message) for message in MESSAGES)
    assert all(same(a, b) for a, b in zip(feed.FeedDecoder().feed(stream), MESSAGES, strict=True))
    rng = random.Random(13)
    for _ in range(20):
        decoder, got, at = feed.FeedDecoder(), [], 0
        while at < len(stream):
            step = rng.randint(1, 40)
            got += decoder.feed(stream[at:at + step])
            at += step
        assert len(got) == len(MESSAGES) and all(same(a, b) for a, b in zip(got, MESSAGES, strict=True))
        assert decoder.pending_bytes == 0


def test_a_frame_is_version_kind_length_payload():
    data = feed.encode(feed.SvidDropped("spiffe://cluster.local/ns/a/sa/b"))
    assert data[0] == feed.FEED_VERSION and data[1] == feed.Kind.SVID_DROPPED
    assert int.from_bytes(data[2:6], "big") == len(data) - 6
    assert json.loads(data[6:]) == {"spiffe_id": "spiffe://cluster.local/ns/a/sa/b"}


def test_a_key_never_shows_in_a_repr():
    assert b"PRIVATE" not in repr(GRANT).encode() and "K\\n" not in repr(GRANT)


def frame_of(kind: int, payload: bytes, version: int = feed.FEED_VERSION) -> bytes:
    return feed.HEADER.pack(version, kind, len(payload)) + payload


@pytest.mark.parametrize("data, reason", [
    (frame_of(feed.Kind.SVID_DROPPED, b"{}", version=2), "feed version 2"),
    (frame_of(99, b"{}"), "unknown frame kind 99"),
    (feed.HEADER.pack(feed.FEED_VERSION, feed.Kind.CONFIG_DELTA, feed.MAX_PAYLOAD + 1), "over the"),
    (frame_of(feed.Kind.SVID, b"\xff\xfe"), "not JSON"),
    (frame_of(feed.Kind.SVID, b"[1]"), "not a JSON object"),
    (frame_of(feed.Kind.SVID, json.dumps({"spiffe_id": "spiffe://x/ns/a/sa/b"}).encode()), "chain_pem missing"),
    (frame_of(feed.Kind.SVID, json.dumps({"spiffe_id": "spiffe://x/ns/a/sa/b", "chain_pem": "c", "key_pem": "k",
                                          "roots_pem": "r", "not_before": "soon", "not_after": 2}).encode()),
     "not_before missing or not a number"),
    (frame_of(feed.Kind.SVID_PENDING, json.dumps({"spiffe_id": "web"}).encode()), "not a SPIFFE ID"),
    (frame_of(feed.Kind.CONFIG_SNAPSHOT, b"\x0a\xff\xff\xff"), "CONFIG_SNAPSHOT"),
    (frame_of(feed.Kind.CONFIG_DELTA, b"\x22\x03bad"), "bad resource key"),
])
def test_broken_frames_are_refused_and_nothing_after_them_is_trusted(data, reason):
    decoder = feed.FeedDecoder()
    with pytest.raises(feed.FeedError, match=reason):
        decoder.feed(data)
    with pytest.raises(feed.FeedError):   # even a good frame, once the stream broke
        decoder.feed(feed.encode(GRANT))


def test_an_invalid_resource_is_refused_as_from_the_controller():
    bad = feed.encode(feed.ConfigUpdate(m.ConfigDelta(version="1", upserted=(
        m.Workload(uid="u", name="w", namespace="demo", service_account="sa", node="n", ip="not-an-ip",
                   identity=1, spiffe_id="spiffe://cluster.local/ns/demo/sa/sa", meshed=True),))))
    with pytest.raises(feed.FeedError, match="not-an-ip"):
        feed.FeedDecoder().feed(bad)


def test_an_oversized_message_is_refused_when_encoded_too(monkeypatch):
    monkeypatch.setattr(feed, "MAX_PAYLOAD", 10)
    with pytest.raises(feed.FeedError, match="over the 10 limit"):
        feed.encode(GRANT)
