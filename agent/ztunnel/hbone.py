"""HBONE: TCP tunnelled in HTTP/2 CONNECT streams, as a pure protocol layer (no I/O).

Bytes from the (TLS-decrypted) connection go in through :meth:`HboneConnection.receive`,
tunnel events come out; commands (``connect``, ``respond``, ``send``, ``end``...) queue
bytes that the driver collects with :meth:`data_to_send`. The asyncio driver owns the
sockets, timers and backpressure; this module owns HTTP/2 (through ``h2``) and the HBONE
rules: ``:authority`` is the destination ``ip:port``, the request carries ``forwarded``
and a W3C ``traceparent``, the answer is 200 / 400 / 401 / 503.

Speed: windows and frames are large (ztunnel's 4 MiB stream windows, 1 MiB frames), so
Python work is per frame, not per byte; flow control is credited back only once the
driver says the bytes left the process (``consumed``), which is the backpressure.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame

# h2 4.x formats repr(frame) for its trace log on every received frame, logging on or
# off, and hyperframe's DATA repr hex-encodes the whole payload to show 20 characters:
# a third of the proxy's CPU with 1 MiB frames. Describe DATA frames by size instead.
hyperframe.frame.DataFrame._body_repr = lambda frame: f"<{len(frame.data)} bytes>"

STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME = 1024 * 1024
MAX_STREAMS = 100

STATUS_OK = 200
STATUS_BAD_REQUEST = 400
STATUS_UNAUTHORIZED = 401
STATUS_UNAVAILABLE = 503


# -- events -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TunnelRequested:
    """Server side: a well-formed CONNECT; answer with ``respond``."""
    stream_id: int
    host: str
    port: int
    forwarded_for: str | None       # the original client's IP (RFC 7239 ``for=``)
    traceparent: str | None
    forwarded_port: int = 0         # and its port, when the client proxy sent one


@dataclass(frozen=True)
class RequestRejected:
    """Server side: a malformed CONNECT, already answered (400); for logs and metrics."""
    stream_id: int
    status: int
    reason: str


@dataclass(frozen=True)
class TunnelResponse:
    """Client side: the server's answer to our CONNECT."""
    stream_id: int
    status: int


@dataclass(frozen=True)
class TunnelData:
    stream_id: int
    data: bytes
    flow_controlled_length: int  # pass to ``consumed`` once written out


@dataclass(frozen=True)
class TunnelEnded:
    """The peer half-closed its direction (END_STREAM)."""
    stream_id: int


@dataclass(frozen=True)
class TunnelReset:
    stream_id: int
    error_code: int


@dataclass(frozen=True)
class WindowOpened:
    """Send credit grew (stream_id 0: the connection); retry pending ``send`` data."""
    stream_id: int


@dataclass(frozen=True)
class SettingsAcked:
    """The peer applied our last SETTINGS (e.g. the drain's zero stream limit)."""


@dataclass(frozen=True)
class ConnectionEnded:
    """GOAWAY received, or a protocol violation (``error`` set; GOAWAY already queued)."""
    error: str | None
    last_stream_id: int | None = None


Event = (TunnelRequested | RequestRejected | TunnelResponse | TunnelData | TunnelEnded
         | TunnelReset | WindowOpened | SettingsAcked | ConnectionEnded)


def format_authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_authority(authority: str) -> tuple[str, int]:
    """``ip:port`` or ``[ipv6]:port`` -> (ip, port); ValueError for anything else."""
    host, sep, port_text = authority.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"authority {authority!r} is not ip:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    address = ipaddress.ip_address(host)  # raises ValueError: names are not allowed
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return str(address), port


def new_traceparent() -> str:
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


class HboneConnection:
    """One HTTP/2 connection carrying HBONE tunnels (either side)."""

    def __init__(self, client_side: bool, stream_window: int = STREAM_WINDOW,
                 connection_window: int = CONNECTION_WINDOW, max_frame: int = MAX_FRAME,
                 max_streams: int = MAX_STREAMS):
        config = h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8")
        self.client_side = client_side
        self._h2 = h2.connection.H2Connection(config=config)
        self._h2.local_settings = h2.settings.Settings(client=client_side, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: max_frame,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        self._h2.max_inbound_frame_size = max_frame  # h2 reads it once, from the defaults
        self._connection_window = connection_window
        self._max_frame = max_frame
        self.closed = False

    # -- lifecycle
    def initiate(self) -> None:
        self._h2.initiate_connection()
        extra = self._connection_window - 65535
        if extra > 0:
            self._h2.increment_flow_control_window(extra)

    def data_to_send(self) -> bytes:
        return self._h2.data_to_send()

    def drain(self) -> None:
        """Ask the peer to open no more tunnels here (MAX_CONCURRENT_STREAMS 0). Unlike a
        GOAWAY (after which h2 can no longer send), live tunnels carry on; streams the
        peer opened before applying it arrive before its ACK and are still served."""
        self._h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0})

    def close(self, error_code: int = 0) -> None:
        if not self.closed:
            self.closed = True
            self._h2.close_connection(error_code)

    @property
    def open_streams(self) -> int:
        return self._h2.open_outbound_streams if self.client_side else self._h2.open_inbound_streams

    @property
    def stream_capacity(self) -> int:
        """How many more tunnels the peer lets us open on this connection."""
        limit = self._h2.remote_settings.max_concurrent_streams
        return 0 if self.closed else max(0, min(limit, MAX_STREAMS) - self.open_streams)

    # -- commands
    def connect(self, host: str, port: int, forwarded_for: str, traceparent: str, forwarded_port: int = 0) -> int:
        stream_id = self._h2.get_next_available_stream_id()
        self._h2.send_headers(stream_id, [
            (":method", "CONNECT"),
            (":authority", format_authority(host, port)),
            ("forwarded", f'for="{_forwarded_node(forwarded_for, forwarded_port)}"'),
            ("traceparent", traceparent),
        ])
        return stream_id

    def respond(self, stream_id: int, status: int) -> None:
        self._h2.send_headers(stream_id, [(":status", str(status))], end_stream=status != STATUS_OK)

    def send(self, stream_id: int, data: memoryview) -> int:
        """Queue as much of ``data`` as flow control allows; return how many bytes went.

        A stream h2 already closed takes nothing (0): h2 processes a whole read before
        we see its events, so a reset can be known here before its ``TunnelReset``
        arrives, which then ends the stream's peer."""
        sent = 0
        total = len(data)
        try:
            while sent < total:
                window = self._h2.local_flow_control_window(stream_id)
                chunk = min(window, self._max_frame, self._h2.max_outbound_frame_size, total - sent)
                if chunk <= 0:
                    break
                self._h2.send_data(stream_id, data[sent:sent + chunk])
                sent += chunk
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return sent
        return sent

    def end(self, stream_id: int) -> None:
        try:
            self._h2.end_stream(stream_id)
        except h2.exceptions.StreamClosedError:
            pass  # reset meanwhile: the reset already told the peer

    def reset(self, stream_id: int, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        try:
            self._h2.reset_stream(stream_id, error_code)
        except h2.exceptions.ProtocolError:
            pass  # the stream or the whole connection is already gone: nothing to reset

    def consumed(self, stream_id: int, length: int) -> None:
        """Credit back ``length`` bytes of received DATA (they have been written out)."""
        if length and not self.closed:
            try:
                self._h2.acknowledge_received_data(length, stream_id)
            except h2.exceptions.StreamClosedError:
                # The stream ended meanwhile; the connection window still needs the credit.
                self._h2.increment_flow_control_window(length)

    # -- input
    def receive(self, data: bytes) -> list[Event]:
        try:
            h2_events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.close(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return [ConnectionEnded(error=f"{type(exc).__name__}: {exc}")]
        events: list[Event] = []
        for ev in h2_events:
            if isinstance(ev, h2.events.DataReceived):
                if ev.flow_controlled_length:
                    events.append(TunnelData(ev.stream_id, ev.data, ev.flow_controlled_length))
            elif isinstance(ev, h2.events.RequestReceived):
                events.append(self._on_request(ev))
            elif isinstance(ev, h2.events.ResponseReceived):
                status = dict(ev.headers).get(":status", "0")
                events.append(TunnelResponse(ev.stream_id, int(status) if status.isdigit() else 0))
            elif isinstance(ev, h2.events.StreamEnded):
                events.append(TunnelEnded(ev.stream_id))
            elif isinstance(ev, h2.events.StreamReset):
                events.append(TunnelReset(ev.stream_id, int(ev.error_code)))
            elif isinstance(ev, h2.events.WindowUpdated):
                events.append(WindowOpened(ev.stream_id))
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                events.append(WindowOpened(0))  # initial window may have grown
            elif isinstance(ev, h2.events.SettingsAcknowledged):
                events.append(SettingsAcked())
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.closed = True
                events.append(ConnectionEnded(None if ev.error_code == 0 else f"GOAWAY {ev.error_code!r}",
                                              ev.last_stream_id))
        return events

    def _on_request(self, ev: h2.events.RequestReceived) -> Event:
        headers = dict(ev.headers)
        reason = None
        host, port = "", 0
        if self.client_side:
            reason = "request on a client connection"
        elif headers.get(":method") != "CONNECT":
            reason = f"method {headers.get(':method')!r} is not CONNECT"
        elif ":authority" not in headers:
            reason = "CONNECT without :authority"
        else:
            try:
                host, port = parse_authority(headers[":authority"])
            except ValueError as exc:
                reason = str(exc)
        if reason is not None:
            self.respond(ev.stream_id, STATUS_BAD_REQUEST)
            return RequestRejected(ev.stream_id, STATUS_BAD_REQUEST, reason)
        client_ip, client_port = _forwarded_for(headers.get("forwarded"))
        return TunnelRequested(ev.stream_id, host, port, client_ip, headers.get("traceparent"), client_port)


def _forwarded_for(value: str | None) -> tuple[str | None, int]:
    """The node of an RFC 7239 ``for=`` (``ip``, ``"ip:port"``, ``"[v6]:port"``) as
    (ip, port); (None, 0) when absent or not an IP address."""
    if not value:
        return None, 0
    for part in value.split(";"):
        key, _, item = part.strip().partition("=")
        if key.strip().lower() != "for":
            continue
        item = item.strip().strip('"')
        port_text = ""
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
        elif item.count(":") == 1:
            host, _, port_text = item.partition(":")
        else:
            host = item
        try:
            ip = str(ipaddress.ip_address(host))
        except ValueError:
            return None, 0
        port = int(port_text) if port_text.isdigit() and 0 < int(port_text) < 65536 else 0
        return ip, port
    return None, 0


def _forwarded_node(ip: str, port: int = 0) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"{host}:{port}" if port else host
