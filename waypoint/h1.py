"""HTTP/1.1 framing, sans I/O, on llhttp (``httptools``): the waypoint's hot path.

``RequestReader`` turns a client's bytes into events (``RequestHead``, body ``bytes``,
``END``, ``Upgraded``); ``ResponseReader`` does the same for an upstream's answer; the
``encode_*`` functions write heads and chunked bodies. No sockets here: the drivers in
``downstream.py`` and ``upstream.py`` feed bytes in and write bytes out.

llhttp (strict, its default) already refuses what a proxy must not repair: Content-Length
with Transfer-Encoding, a repeated or list-valued Content-Length, folded header lines
(obs-fold), bare LF line ends, control characters, bad chunk sizes. The checks that
matter most are repeated here on the parsed head anyway (request smuggling must not
depend on one library's defaults), with the limits llhttp does not have: head size,
header count, HTTP version, the Host header.
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from operator import itemgetter

import httptools

from .http import ResponseHead


class H1Error(Exception):
    """The client's request cannot be served: answer ``status`` and close (counted as ``reason``)."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


class UpstreamFramingError(Exception):
    """The upstream's answer does not parse as HTTP/1.1."""


@dataclass(slots=True)
class RequestHead:
    """A parsed request head; never changed once made (a reader hands the same object out
    again for the same head bytes on its connection)."""

    method: str
    target: str
    version: str                        # "1.1" | "1.0"
    headers: list[tuple[str, str]]      # lower-case names, in order, Host included
    content_length: int | None          # None: chunked
    keep_alive: bool
    upgrade: str | None                 # the Upgrade token when the client asked to switch protocols
    expect_continue: bool


@dataclass(slots=True)
class Upgraded:
    """The connection switched protocols: ``leftover`` are the first bytes of the new one."""

    leftover: bytes


class _End:
    __slots__ = ()

    def __repr__(self) -> str:
        return "END"


END = _End()   # the current message is complete

Event = RequestHead | ResponseHead | bytes | _End | Upgraded | H1Error

_SUPPORTED_VERSIONS = ("1.1", "1.0")


HEAD_END = b"\r\n\r\n"


def _whole_message(data: bytes, events: deque, before: int,
                   head_type: type[RequestHead] | type[ResponseHead]) -> tuple | None:
    """``(head bytes, head, body length)`` when ``data``, fed at the start of a message, was
    exactly one keep-alive message of known length: its events (from ``before``) are that
    head, at most one body chunk and ``END``, and the bytes are the head, up to its first
    blank line (llhttp allows no bare CR or LF inside a head), then the body, nothing else.
    llhttp is then at the start of a message again, as it was: the same bytes would give the
    same events (``RequestReader.feed``, ``ResponseReader.feed``)."""
    count = len(events) - before
    if count not in (2, 3) or events[-1] is not END or type(data) is not bytes:
        return None
    head = events[before]
    # isinstance, not type(head) is: mypy narrows it (neither head class has subclasses).
    if not isinstance(head, head_type) or not head.keep_alive or head.content_length is None:
        return None
    length = head.content_length
    if count == 3:
        body = events[before + 1]
        if type(body) is not bytes or len(body) != length or not data.endswith(body):
            return None
    elif length:
        return None
    head_size = data.find(HEAD_END) + len(HEAD_END)
    if head_size < len(HEAD_END) or head_size + length != len(data) or data[:1] in (b"\r", b"\n"):
        return None
    return data[:head_size], head, length


def _replayed(replay: tuple, data: bytes, events: deque) -> bool:
    """Whether ``data`` is the whole message ``replay`` (from ``_whole_message``) again: the
    same head bytes and a body of the same length. If so its head and body are appended to
    ``events`` (the caller ends the message)."""
    raw, head, length = replay
    if len(data) != len(raw) + length or type(data) is not bytes or not data.startswith(raw):
        return False
    events.append(head)
    if length:
        events.append(data[len(raw):])
    return True


# Request header names the reader acts on (one set lookup per header instead of a chain of comparisons).
_REQUEST_FRAMING = frozenset({"content-length", "transfer-encoding", "host", "upgrade", "expect"})


class RequestReader:
    """Requests from one client connection, as events in ``events`` after each ``feed``.

    A request that must be refused becomes an ``H1Error`` event, after the events of
    the requests before it (pipelined): those are still answered, then the connection
    closes with the error's status. ``in_head`` says a request head is
    partly received (the slowloris deadline runs then). After ``Upgraded`` the bytes are
    not HTTP any more: stop feeding.
    """

    def __init__(self, max_header_bytes: int = 64 * 1024, max_headers: int = 100) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.events: deque[Event] = deque()
        self.in_head = False
        self.upgraded = False
        self.failed = False
        self._parser = httptools.HttpRequestParser(self)
        self._pending_head_bytes = 0
        self._url = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []   # as llhttp gives them (decoded in _head)
        self._error: H1Error | None = None
        # The last head parsed and what it was made of (method, URL, version, raw headers): a
        # keep-alive client sends the same head again and again, which then gets the same
        # (immutable) RequestHead without decoding and checking it again.
        self._last_parts: tuple | None = None
        self._last_head: RequestHead | None = None
        # The last feed when it was one whole keep-alive request (``_whole_message``): the
        # same head bytes and a body of the same length again give the same events without
        # llhttp and its callbacks (a keep-alive client sends the same request again and again).
        self._replay: tuple[bytes, RequestHead, int] | None = None
        self._begun = 0     # messages llhttp began (on_message_begin) and ended (on_message_complete)
        self._ended = 0

    def feed(self, data: bytes) -> None:
        if self.failed or self.upgraded:
            return      # nothing after a refusal or a protocol switch is HTTP/1 to parse
        replay = self._replay
        if replay is not None:
            if _replayed(replay, data, self.events):
                self.events.append(END)
                return
            self._replay = None
        at_start = not self.in_head and self._begun == self._ended
        before, begun = len(self.events), self._begun
        if self.in_head:
            self._pending_head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as switch:
            self.upgraded = True
            self.events.append(Upgraded(data[switch.args[0]:]))
        except httptools.HttpParserCallbackError:
            error, self._error = self._error, None
            if error is None:
                raise
            self._refuse(error)
        except httptools.HttpParserError as err:
            self._refuse(_classify(str(err)))
        else:
            if self.in_head and self._pending_head_bytes > self.max_header_bytes:
                self._refuse(H1Error(431, "header_too_large", f"request head over {self.max_header_bytes} bytes"))
            elif at_start and self._begun == begun + 1 == self._ended:
                self._replay = _whole_message(data, self.events, before, RequestHead)

    def _refuse(self, error: H1Error) -> None:
        """The error is an event: the requests complete before it are still served, in order."""
        self.failed = True
        self.events.append(error)

    # -- llhttp callbacks (through httptools)

    def on_message_begin(self) -> None:
        self._begun += 1
        self.in_head = True
        self._pending_head_bytes = 0
        self._url = b""
        self._raw_headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser = self._parser
        parts = (parser.get_method(), self._url, parser.get_http_version(), self._raw_headers)
        last = self._last_head
        if last is not None and parts == self._last_parts:
            # The same bytes as the last head: the same checks pass, the same head results
            # (llhttp's keep-alive and upgrade answers read only the version and the headers).
            self.events.append(last)
            return
        try:
            head = self._head(*parts)
        except H1Error as err:
            self._error = err
            raise
        self._last_parts, self._last_head = parts, head
        self.events.append(head)

    def on_body(self, body: bytes) -> None:
        self.events.append(body)

    def on_message_complete(self) -> None:
        self._ended += 1
        self.events.append(END)

    def _head(self, raw_method: bytes, url: bytes, version: str, raw_headers: list[tuple[bytes, bytes]]) -> RequestHead:
        parser = self._parser
        if version not in _SUPPORTED_VERSIONS:
            if version.startswith(("2", "3")):
                raise H1Error(505, "bad_version", f"HTTP/{version} not supported on HTTP/1")
            raise H1Error(400, "bad_version", f"HTTP/{version} not supported")
        if len(raw_headers) > self.max_headers:
            raise H1Error(431, "too_many_headers", f"{len(raw_headers)} headers (limit {self.max_headers})")
        size = len(url) + sum(len(name) + len(value) + 4 for name, value in raw_headers)
        if size > self.max_header_bytes:
            raise H1Error(431, "header_too_large", f"{size} header bytes (limit {self.max_header_bytes})")
        headers = [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in raw_headers]
        method = raw_method.decode("ascii")
        if method == "CONNECT":
            raise H1Error(501, "malformed_request", "CONNECT is not proxied")
        content_length: int | None = 0
        lengths = transfer_encodings = 0
        host = upgrade = None
        expect_continue = False
        for name, value in headers:
            if name not in _REQUEST_FRAMING:
                continue
            if name == "content-length":
                lengths += 1
                content_length = int(value)        # llhttp checked the digits
            elif name == "transfer-encoding":
                transfer_encodings += 1
                if value.strip().lower() != "chunked":
                    raise H1Error(400, "request_smuggling", f"Transfer-Encoding {value!r} (only chunked)")
                content_length = None
            elif name == "host":
                host = value
            elif name == "upgrade":
                upgrade = value
            elif name == "expect":
                expect_continue = value.strip().lower() == "100-continue"
        if lengths and transfer_encodings:
            raise H1Error(400, "request_smuggling", "both Content-Length and Transfer-Encoding")
        if lengths > 1 or transfer_encodings > 1:
            raise H1Error(400, "request_smuggling", "more than one Content-Length or Transfer-Encoding")
        if host is None and version == "1.1":
            raise H1Error(400, "malformed_request", "no Host header")
        if upgrade is not None and not parser.should_upgrade():
            upgrade = None      # Upgrade without "Connection: upgrade" is only a header
        return RequestHead(method=method, target=url.decode("latin-1"), version=version, headers=headers,
                           content_length=content_length, keep_alive=parser.should_keep_alive(), upgrade=upgrade,
                           expect_continue=expect_continue)


# llhttp's messages for the framing a proxy must not repair (see the module docstring).
_SMUGGLING = ("Content-Length", "Transfer-Encoding", "whitespace after header value", "Duplicate")


def _classify(message: str) -> H1Error:
    if any(marker in message for marker in _SMUGGLING):
        return H1Error(400, "request_smuggling", message)
    if "Invalid HTTP version" in message:
        return H1Error(505 if "HTTP/2" in message else 400, "bad_version", message)
    return H1Error(400, "malformed_request", message)


class ResponseReader:
    """One upstream answer (1xx interim answers skipped), as events in ``events``.

    ``head_only`` is for answers to HEAD: they announce a body they do not carry.
    ``eof()`` when the upstream closed: ends a body delimited by the close, else fails.
    ``reusable`` is True once the answer is complete and the connection may carry
    another exchange.
    """

    def __init__(self, head_only: bool = False) -> None:
        self.events: deque[Event] = deque()
        self.head_only = head_only
        self.done = False
        self.reusable = False
        self.received = 0
        self._parser = httptools.HttpResponseParser(self)
        self._raw_headers: list[tuple[bytes, bytes]] = []   # as llhttp gives them (decoded in _answer_head)
        self._head: ResponseHead | None = None
        self._until_close = False
        self._interim = False
        # The last answer head and what it was made of: an origin answers requests alike with
        # the same head, which then gets the same (immutable) ResponseHead without decoding it again.
        self._last_parts: tuple | None = None
        self._last_head: ResponseHead | None = None
        self._last_until_close = False
        # The last answer when it came whole in one feed (``_whole_message``): the same head
        # bytes and a body of the same length, on the same parser, give the same events
        # without llhttp and its callbacks (an origin answers requests alike alike).
        self._replay: tuple[bytes, ResponseHead, int] | None = None
        self._begun = 0     # messages llhttp began (on_message_begin)

    def next_answer(self, head_only: bool = False) -> "ResponseReader":
        """The reader of the next answer on the same connection.

        The same llhttp parser when this answer ended cleanly (complete, keep-alive, nothing
        after it, not an answer to HEAD): llhttp is then at the start of the next message.
        Otherwise a fresh reader."""
        if not self.reusable or self.head_only:
            return ResponseReader(head_only)
        self.events = deque()
        self.head_only = head_only
        self.done = self.reusable = False
        self.received = 0
        self._raw_headers = []
        self._head = None
        self._until_close = self._interim = False
        return self

    def feed(self, data: bytes) -> None:
        first = self.received == 0      # llhttp is at the start of this answer (next_answer)
        self.received += len(data)
        if self.done:
            self.reusable = False       # bytes nobody asked for: never reuse this connection
            return
        replay = self._replay
        if replay is not None:
            if first and not self.head_only and _replayed(replay, data, self.events):
                # What llhttp's callbacks would do: the head, the body, then _finish(keep-alive).
                self._head, self._until_close = replay[1], False
                self._finish(True)
                return
            self._replay = None
        before, begun = len(self.events), self._begun
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as switch:
            self.done = True
            self.events.append(Upgraded(data[switch.args[0]:]))
        except httptools.HttpParserError as err:
            if self.done and self.head_only:
                self.reusable = False
                return
            raise UpstreamFramingError(str(err)) from None
        else:
            if first and not self.head_only and self._begun == begun + 1 and self.reusable \
                    and 200 <= self._head.status not in (204, 304):   # type: ignore[union-attr]
                self._replay = _whole_message(data, self.events, before, ResponseHead)

    def eof(self) -> None:
        if self.done:
            return
        if self._head is not None and self._until_close:
            self.done = True
            self.events.append(END)
            return
        raise UpstreamFramingError("connection closed before the answer was complete")

    # -- llhttp callbacks

    def on_message_begin(self) -> None:
        self._begun += 1
        if self.done:
            self.reusable = False
        self._raw_headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._interim = True
            return
        # llhttp's keep-alive answer reads the version and the headers: with them, the same head.
        parts = (status, parser.should_keep_alive(), self.head_only, self._raw_headers)
        last = self._last_head
        if last is not None and parts == self._last_parts:
            head, self._until_close = last, self._last_until_close
        else:
            head = self._answer_head(*parts)
            self._last_parts, self._last_head, self._last_until_close = parts, head, self._until_close
        self._head = head
        self.events.append(head)
        if self.head_only and status != 101:
            self._finish(head.keep_alive)

    def _answer_head(self, status: int, llhttp_keep_alive: bool, head_only: bool,
                     raw_headers: list[tuple[bytes, bytes]]) -> ResponseHead:
        headers = [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in raw_headers]
        length: int | None = None
        chunked = False
        for name, value in headers:
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                chunked = True
        no_body = head_only or status in (204, 304) or status == 101
        if no_body:
            length = 0 if status in (204, 304) else length
        self._until_close = not no_body and length is None and not chunked
        return ResponseHead(status, headers, length, llhttp_keep_alive and not self._until_close)

    def on_body(self, body: bytes) -> None:
        self.events.append(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if not self.done:
            self._finish(self._head is not None and self._head.keep_alive)

    def _finish(self, reusable: bool) -> None:
        self.done = True
        self.reusable = reusable
        self.events.append(END)


def encode_head(first_line: str, headers: list[tuple[str, str]]) -> bytes:
    """A head from trusted parts, checked anyway: no CR or LF in any name or value (no
    response splitting), no ':' in a name. The checks run on the joined text, in C,
    instead of five per header."""
    text = "\r\n".join([first_line, *[f"{name}: {value}" for name, value in headers], "\r\n"])
    line_ends = len(headers) + 2    # the first line's, each header's, the blank line's
    if text.count("\r") != line_ends or text.count("\n") != line_ends or ":" in "".join(map(_NAME, headers)):
        bad = next((n for n, v in headers if "\r" in n + v or "\n" in n + v or ":" in n), first_line)
        raise ValueError(f"header {bad!r} would split the message")
    return text.encode("latin-1")


_NAME = itemgetter(0)
_SPLITS_REQUEST_LINE = re.compile(r"[\x00-\x20\x7f]")


def encode_request_head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    """A request head; a target with whitespace or control characters (a rewritten path
    from a bad filter) would split the request line, so it is refused (ValueError)."""
    if not target or _SPLITS_REQUEST_LINE.search(target):
        raise ValueError(f"request target {target!r} would split the request line")
    return encode_head(f"{method} {target} HTTP/1.1", headers)


ResponseFraming = tuple[bytes, bool, bool, bool]   # (head bytes, chunked, no body, connection closes after)


def frame_response_head(status: int, headers: list[tuple[str, str]], content_length: int | None,
                        request_method: str, request_version: str, close: bool) -> ResponseFraming:
    """How an answer goes to an HTTP/1.x client: its head (framing headers added, any
    ``connection`` header replaced) and how its body is framed. A pure function of its
    arguments, so callers may keep the result for answers alike (``fastpath``)."""
    no_body = request_method == "HEAD" or status in (204, 304) or status < 200
    chunked = False
    headers = [(n, v) for n, v in headers if n != "connection"]
    if not no_body and content_length is None:
        if request_version == "1.1":
            chunked = True
            headers.append(("transfer-encoding", "chunked"))
        else:
            close = True     # an HTTP/1.0 client reads the body until the connection closes
    elif content_length is not None and not no_body and not any(n == "content-length" for n, _ in headers):
        headers.append(("content-length", str(content_length)))
    if close:
        headers.append(("connection", "close"))
    elif request_version == "1.0":
        headers.append(("connection", "keep-alive"))
    return encode_head(status_line(status), headers), chunked, no_body, close


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data) if data else b""


LAST_CHUNK = b"0\r\n\r\n"


def _status_lines() -> dict[int, str]:
    return {status.value: f"HTTP/1.1 {status.value} {status.phrase}" for status in HTTPStatus}


_STATUS_LINES = _status_lines()


def status_line(status: int) -> str:
    """``HTTP/1.1 200 OK``: with a reason phrase, which some clients (h2load) want though HTTP/1.1 makes it optional."""
    return _STATUS_LINES.get(status) or f"HTTP/1.1 {status} "
