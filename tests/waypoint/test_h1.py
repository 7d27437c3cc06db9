"""The HTTP/1.1 framing layer (waypoint/h1.py) without sockets: bytes in, events out."""
import pytest

from shoal.waypoint.h1 import (
    END,
    LAST_CHUNK,
    H1Error,
    RequestHead,
    RequestReader,
    ResponseReader,
    Upgraded,
    UpstreamFramingError,
    encode_chunk,
    encode_head,
    encode_request_head,
    status_line,
)
from shoal.waypoint.http import ResponseHead


def request_events(*chunks: bytes, **limits) -> list:
    reader = RequestReader(**limits)
    for chunk in chunks:
        reader.feed(chunk)
    return list(reader.events)


def refusal(*chunks: bytes, **limits) -> H1Error:
    events = request_events(*chunks, **limits)
    assert isinstance(events[-1], H1Error), events
    assert not any(isinstance(e, RequestHead) for e in events), events
    return events[-1]


def test_a_request_with_a_body_split_anywhere_gives_the_same_events():
    raw = b"POST /a?b=1 HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nX-Two: a\r\nX-Two: b\r\n\r\nhello"
    for cut in range(1, len(raw)):
        events = request_events(raw[:cut], raw[cut:])
        head = events[0]
        assert isinstance(head, RequestHead)
        assert (head.method, head.target, head.version, head.content_length) == ("POST", "/a?b=1", "1.1", 5)
        assert head.headers == [("host", "web"), ("content-length", "5"), ("x-two", "a"), ("x-two", "b")]
        assert b"".join(e for e in events if isinstance(e, bytes)) == b"hello" and events[-1] is END


def test_the_same_head_again_on_a_connection_is_the_same_head_and_any_difference_is_parsed():
    """A keep-alive client's same head bytes give the same (immutable) RequestHead; a head
    that differs in the method, target, version, a header name or value is parsed as itself,
    and a refused head behind good ones is still refused."""
    base = b"GET /a HTTP/1.1\r\nHost: web\r\nX-Note: 1\r\n\r\n"
    variants = {b"HEAD /a HTTP/1.1\r\nHost: web\r\nX-Note: 1\r\n\r\n": ("HEAD", "/a", "1.1", [("host", "web"), ("x-note", "1")], True),
                b"GET /b HTTP/1.1\r\nHost: web\r\nX-Note: 1\r\n\r\n": ("GET", "/b", "1.1", [("host", "web"), ("x-note", "1")], True),
                b"GET /a HTTP/1.0\r\nHost: web\r\nX-Note: 1\r\n\r\n": ("GET", "/a", "1.0", [("host", "web"), ("x-note", "1")], False),
                b"GET /a HTTP/1.1\r\nHost: web\r\nX-Note: 2\r\n\r\n": ("GET", "/a", "1.1", [("host", "web"), ("x-note", "2")], True),
                b"GET /a HTTP/1.1\r\nHost: web\r\nX-Other: 1\r\n\r\n": ("GET", "/a", "1.1", [("host", "web"), ("x-other", "1")], True),
                b"GET /a HTTP/1.1\r\nHost: other\r\nX-Note: 1\r\n\r\n": ("GET", "/a", "1.1", [("host", "other"), ("x-note", "1")], True),
                b"GET /a HTTP/1.1\r\nHost: web\r\nX-Note: 1\r\nConnection: close\r\n\r\n":
                    ("GET", "/a", "1.1", [("host", "web"), ("x-note", "1"), ("connection", "close")], False)}
    for raw, expected in variants.items():
        reader = RequestReader()
        for chunk in (base, base, raw):
            reader.feed(chunk)
        first, again, other = [e for e in reader.events if isinstance(e, RequestHead)]
        assert reader.events.count(END) == 3
        assert again is first and (first.method, first.target, first.headers) == ("GET", "/a", [("host", "web"), ("x-note", "1")])
        assert (other.method, other.target, other.version, other.headers, other.keep_alive) == expected
        assert other == request_events(raw)[0]
        if other.keep_alive:
            reader.feed(base)
            last = reader.events[-2]
            assert last == first and last is not first   # parsed again: it differed from the head before it
    reader = RequestReader()
    reader.feed(base + base + b"GET /a HTTP/1.1\r\nX-Note: 1\r\n\r\n")   # no Host
    assert reader.events[2] is reader.events[0] and isinstance(reader.events[4], H1Error)


def test_chunked_bodies_come_out_decoded():
    events = request_events(b"POST / HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert events[0].content_length is None
    assert b"".join(e for e in events if isinstance(e, bytes)) == b"abcde" and events[-1] is END


def test_pipelined_requests_are_served_before_a_refusal_behind_them():
    events = request_events(b"GET /1 HTTP/1.1\r\nHost: w\r\n\r\nGET /2 HTTP/1.1\r\nHost: w\r\n\r\nGARBAGE\r\n\r\n")
    assert [e.target for e in events if isinstance(e, RequestHead)] == ["/1", "/2"]
    assert isinstance(events[-1], H1Error) and events[-1].status == 400


def test_keep_alive_follows_the_version_and_connection_header():
    assert request_events(b"GET / HTTP/1.1\r\nHost: w\r\n\r\n")[0].keep_alive
    assert not request_events(b"GET / HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n")[0].keep_alive
    assert not request_events(b"GET / HTTP/1.0\r\n\r\n")[0].keep_alive
    assert request_events(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")[0].keep_alive


@pytest.mark.parametrize("raw", [
    b"POST / HTTP/1.1\r\nHost: w\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: w\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: w\r\nContent-Length: 5, 5\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: w\r\nContent-Length: +5\r\n\r\nhello",
    b"GET / HTTP/1.1\r\nHost: w\r\nX-Folded: a\r\n b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: w\r\nX-Folded: a\r\n\tb\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: identity\r\n\r\n",
])
def test_request_smuggling_is_refused_with_400(raw):
    error = refusal(raw)
    assert (error.status, error.reason) == (400, "request_smuggling"), error.detail


@pytest.mark.parametrize("raw,status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/9.9\r\nHost: w\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: w\r\n\r\n", 505),
    (b"GET /\r\n\r\n", 400),                                   # HTTP/0.9
    (b"GET / HTTP/1.1\r\n\r\n", 400),                          # no Host
    (b"GET / HTTP/1.1\nHost: w\n\n", 400),                      # bare LF
    (b"GET / HTTP/1.1\r\nHost: w\r\nBad Header: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: w\r\nX: a\x00b\r\n\r\n", 400),
    (b"CONNECT web:443 HTTP/1.1\r\nHost: web:443\r\n\r\n", 501),
])
def test_malformed_requests_are_refused(raw, status):
    assert refusal(raw).status == status


def test_head_size_and_header_count_limits():
    big = b"GET / HTTP/1.1\r\nHost: w\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n"
    assert refusal(big, max_header_bytes=4096).status == 431
    # A head arriving in pieces is refused before it completes (its bytes are not kept).
    pieces = [b"GET / HTTP/1.1\r\nHost: w\r\nX-Big: "] + [b"a" * 1000] * 5
    error = refusal(*pieces, max_header_bytes=4096)
    assert (error.status, error.reason) == (431, "header_too_large")
    many = b"GET / HTTP/1.1\r\nHost: w\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(30)) + b"\r\n"
    assert (refusal(many, max_headers=20).reason) == "too_many_headers"


def test_nothing_is_parsed_after_a_refusal():
    reader = RequestReader()
    reader.feed(b"GET / HTTP/1.1\r\nHost: w\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx")
    reader.feed(b"GET / HTTP/1.1\r\nHost: w\r\n\r\n")
    assert len(reader.events) == 1 and isinstance(reader.events[0], H1Error)


def test_upgrade_hands_over_the_bytes_after_the_head():
    events = request_events(b"GET /ws HTTP/1.1\r\nHost: w\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x01x")
    assert events[0].upgrade == "websocket" and events[1] is END
    assert isinstance(events[2], Upgraded) and events[2].leftover == b"\x81\x01x"
    # Upgrade without Connection: upgrade is just a header.
    assert request_events(b"GET / HTTP/1.1\r\nHost: w\r\nUpgrade: websocket\r\n\r\n")[0].upgrade is None


def test_expect_continue_is_reported():
    head = request_events(b"POST / HTTP/1.1\r\nHost: w\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")[0]
    assert head.expect_continue


def response_events(reader: ResponseReader, *chunks: bytes) -> list:
    for chunk in chunks:
        reader.feed(chunk)
    return list(reader.events)


def test_response_with_length_skips_interim_answers_and_is_reusable():
    reader = ResponseReader()
    events = response_events(reader, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: y\r\n\r\n", b"ok")
    assert isinstance(events[0], ResponseHead) and events[0].status == 200 and events[0].content_length == 2
    assert events[1:] == [b"ok", END] and reader.reusable


def test_the_same_answer_head_again_on_a_connection_is_the_same_head_and_any_difference_is_parsed():
    """An upstream's same answer head on a reused reader gives the same (immutable) ResponseHead;
    one that differs in the status, version, a header or the length is parsed as itself."""
    base = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: y\r\n\r\nok"
    variants = {b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nX: y\r\n\r\nok": (201, [("content-length", "2"), ("x", "y")], 2, True),
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: z\r\n\r\nok": (200, [("content-length", "2"), ("x", "z")], 2, True),
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX: y\r\n\r\nok!": (200, [("content-length", "3"), ("x", "y")], 3, True),
                b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nX: y\r\n\r\nok": (200, [("content-length", "2"), ("x", "y")], 2, False),
                b"HTTP/1.1 200 OK\r\nX: y\r\n\r\nok": (200, [("x", "y")], None, False)}
    for raw, expected in variants.items():
        reader = ResponseReader()
        heads = []
        for answer in (base, base, raw):
            reader = reader.next_answer()
            heads.append(response_events(reader, answer)[0])
        assert heads[1] is heads[0] and (heads[0].status, heads[0].keep_alive) == (200, True)
        other = heads[2]
        assert (other.status, other.headers, other.content_length, other.keep_alive) == expected
        assert other == response_events(ResponseReader(), raw)[0]
        if other.keep_alive:
            again = response_events(reader.next_answer(), base)[0]
            assert again == heads[0] and again is not heads[0]   # parsed again: it differed from the head before it
    reader = ResponseReader()
    response_events(reader, base)
    head_answer = response_events(reader.next_answer(head_only=True), b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: y\r\n\r\n")
    assert head_answer[1:] == [END]     # an answer to HEAD: the same bytes, no body


def test_response_until_close_ends_at_eof_and_is_not_reusable():
    reader = ResponseReader()
    response_events(reader, b"HTTP/1.1 200 OK\r\n\r\nabc")
    reader.eof()
    assert list(reader.events)[1:] == [b"abc", END] and not reader.reusable


def test_response_cut_short_is_an_error():
    reader = ResponseReader()
    response_events(reader, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(UpstreamFramingError):
        reader.eof()


def test_head_answers_have_no_body_and_extra_bytes_spoil_the_connection():
    reader = ResponseReader(head_only=True)
    events = response_events(reader, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    assert events[0].content_length == 100 and events[1] is END and reader.reusable
    reader.feed(b"junk")
    assert not reader.reusable


def test_response_connection_close_and_204():
    reader = ResponseReader()
    response_events(reader, b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
    assert reader.events[0].content_length == 0 and reader.events[1] is END and not reader.reusable


def test_switching_protocols_keeps_the_tunnel_bytes():
    reader = ResponseReader()
    events = response_events(reader, b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nRAW")
    assert events[0].status == 101 and isinstance(events[-1], Upgraded) and events[-1].leftover == b"RAW"


def test_bad_response_framing_is_an_error():
    with pytest.raises(UpstreamFramingError):
        ResponseReader().feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n")


def test_encoding():
    assert encode_head(status_line(200), [("a", "b")]) == b"HTTP/1.1 200 OK\r\na: b\r\n\r\n"
    assert encode_head(status_line(599), []) == b"HTTP/1.1 599 \r\n\r\n"
    assert encode_chunk(b"hello") == b"5\r\nhello\r\n" and encode_chunk(b"") == b"" and LAST_CHUNK == b"0\r\n\r\n"
    with pytest.raises(ValueError):
        encode_head("GET / HTTP/1.1", [("x", "a\r\nInjected: yes")])
    assert encode_head("GET / HTTP/1.1", [("host", "a:80"), ("x", "t: 12:00")]) == \
        b"GET / HTTP/1.1\r\nhost: a:80\r\nx: t: 12:00\r\n\r\n"   # colons in values are fine


@pytest.mark.parametrize("header", [("x", "a\rb"), ("x", "a\nb"), ("x\r\ny", "v"), ("x\n", "v"), ("a:b", "v"),
                                    ("x", "\r\n\r\n"), ("x", "\n\r")])
def test_a_header_that_would_split_or_confuse_the_head_is_refused(header):
    with pytest.raises(ValueError):
        encode_head("HTTP/1.1 200 OK", [("ok", "1"), header])


@pytest.mark.parametrize("target", ["/a b", "/a\r\nX-Injected: 1", "/a\x00", ""])
def test_a_target_that_would_split_the_request_line_is_refused(target):
    with pytest.raises(ValueError):
        encode_request_head("GET", target, [("host", "web")])
    assert encode_request_head("GET", "/a?b=%20", [("host", "web")]) == b"GET /a?b=%20 HTTP/1.1\r\nhost: web\r\n\r\n"


def test_the_next_answer_reuses_the_parser_only_after_a_clean_answer():
    first = ResponseReader()
    response_events(first, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    second = first.next_answer()
    assert second is first and not second.done and not second.events and second.received == 0
    events = response_events(second, b"HTTP/1.1 404 Not Found\r\nContent-Length: 1\r\n\r\n", b"x")
    assert events[0].status == 404 and events[1:] == [b"x", END] and second.reusable
    head = second.next_answer(head_only=True)       # an answer to HEAD announces a body it lacks
    assert head is first
    events = response_events(head, b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
    assert events[0].content_length == 99 and events[1:] == [END] and head.reusable
    assert head.next_answer() is not head            # llhttp would wait for those 99 bytes: a fresh parser
    closing = ResponseReader()
    response_events(closing, b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert closing.next_answer() is not closing
    extra = ResponseReader()
    response_events(extra, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert not extra.reusable and extra.next_answer() is not extra


def _parse(reader, data: bytes) -> None:
    """The reference: ``reader`` fed ``data`` through llhttp, whatever whole message it
    remembered (the readers may be compiled: a class of their own could not subclass them)."""
    reader._replay = None
    reader.feed(data)


def _outcome(events) -> list:
    """Events as comparable values (a refusal by its status and reason)."""
    return [(e.status, e.reason) if isinstance(e, H1Error) else e for e in events]


def _identities(events) -> list[list[bool]]:
    """Which heads are the same object."""
    heads = [e for e in events if isinstance(e, RequestHead)]
    return [[a is b for b in heads] for a in heads]


REQUEST = b"POST /a HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhello"
GET = b"GET /a HTTP/1.1\r\nHost: web\r\n\r\n"


@pytest.mark.parametrize("then", [
    REQUEST,                                                        # the same again
    b"POST /a HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nworld",   # same head, another body
    b"POST /a HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhell",    # a body short of its length
    REQUEST + b"\r\n",                                              # a CRLF after the body
    REQUEST + REQUEST,                                              # pipelined, one read
    REQUEST[:20], REQUEST[:-1],                                     # cut in the head, in the body
    b"POST /a HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    b"POST /b HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /a HTTP/1.1\r\nHost: web\r\nContent-Length: 6\r\n\r\nhello!",
    b"POST /a HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nhello",
    b"POST /a HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\nhello",
    b"\r\n" + REQUEST, GET, GET + GET, b"GET /a HTTP/1.1\r\n\r\n",
])
def test_a_request_like_the_one_before_gives_what_llhttp_gives(then):
    """A keep-alive client's same request again skips llhttp (the same head object, the body,
    END), and anything else on the connection, before or after, is what parsing gives."""
    for before in ([REQUEST], [REQUEST, REQUEST], [GET, GET], [REQUEST[:9], REQUEST[9:]],
                   [b"POST /a HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"]):
        chunks = [*before, then, REQUEST, then, GET, REQUEST, REQUEST]
        reader, reference = RequestReader(), RequestReader()
        for chunk in chunks:
            reader.feed(chunk)
            _parse(reference, chunk)
            assert _outcome(reader.events) == _outcome(reference.events), (before, then, chunk)
            assert (reader.failed, reader.upgraded, reader.in_head) == (reference.failed, reference.upgraded, reference.in_head)
        # The same objects where parsing gives the same object (H1Server.request_for reads identity).
        assert _identities(reader.events) == _identities(reference.events)


def test_the_same_request_again_is_not_parsed_again():
    reader = RequestReader()
    reader.feed(REQUEST)
    reader.feed(REQUEST)
    parser, reader._parser = reader._parser, None      # llhttp untouched from now on
    reader.feed(REQUEST)
    reader.feed(REQUEST.replace(b"hello", b"world"))
    assert _outcome(reader.events)[-3:] == [reader.events[0], b"world", END] and reader.events[0].content_length == 5
    assert list(reader.events).count(END) == 4
    reader._parser = parser
    reader.feed(GET)                                   # another head: parsed
    assert reader.events[-2] == request_events(GET)[0]


ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


@pytest.mark.parametrize("then", [
    ANSWER, ANSWER.replace(b"ok", b"no"), ANSWER[:-1], ANSWER + b"\r\n", ANSWER + ANSWER, ANSWER[:15],
    ANSWER.replace(b"200 OK", b"201 Created"), ANSWER.replace(b"Content-Length: 2\r\n", b"Connection: close\r\n"),
    ANSWER.replace(b"Content-Length: 2", b"Content-Length: 2\r\nConnection: close"),
    b"HTTP/1.1 100 Continue\r\n\r\n" + ANSWER, b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", b"\r\n" + ANSWER, b"HTTP/1.1 nope\r\n\r\n",
])
@pytest.mark.parametrize("head_only", [False, True])
def test_an_answer_like_the_one_before_gives_what_llhttp_gives(then, head_only):
    """An origin's same answer again on a reused connection skips llhttp; anything else, an
    answer to HEAD included, is what parsing gives (events, end, reuse, failures)."""
    def exchange(reader, data: bytes, head_only: bool = False, parse=ResponseReader.feed):
        reader = reader.next_answer(head_only)
        try:
            parse(reader, data)
            reader.eof()
        except UpstreamFramingError as err:
            return reader, ("error", str(err) if "closed before" in str(err) else "llhttp")
        return reader, (_outcome(reader.events), reader.done, reader.reusable, reader.received)

    for before in ([ANSWER], [ANSWER, ANSWER]):
        reader, reference = ResponseReader(), ResponseReader()
        for data, only in [*[(b, False) for b in before], (then, head_only), (ANSWER, False), (then, False),
                           (ANSWER, False), (ANSWER, False)]:
            reader, got = exchange(reader, data, only)
            reference, expected = exchange(reference, data, only, parse=_parse)
            assert got == expected, (before, then, data, only)
            assert (reader is reader.next_answer()) == (reference is reference.next_answer())


def test_the_same_answer_again_is_not_parsed_again():
    reader = ResponseReader()
    reader.feed(ANSWER)
    reader = reader.next_answer()
    reader.feed(ANSWER)
    first = reader.events[0]
    reader._parser = None      # llhttp untouched from now on
    reader = reader.next_answer()
    reader.feed(ANSWER.replace(b"ok", b"no"))
    assert list(reader.events) == [first, b"no", END] and reader.done and reader.reusable and reader.received == len(ANSWER)
