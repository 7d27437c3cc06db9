"""Pod handover between the agent and the node proxy (contract B, after ztunnel's ZDS).

Transport: a Unix SOCK_SEQPACKET socket at ``ClusterLayout.zds_socket(node)``; the
proxy listens, the agent connects. Every message is one JSON object, with at most one
file descriptor attached (SCM_RIGHTS): the pod's network namespace on ``add``.

agent -> proxy::

    {"type": "hello", "version": 1}
    {"type": "add", "uid", "namespace", "name", "ip", "service_account"}   + netns fd
    {"type": "del", "uid"}
    {"type": "snapshot_sent"}          after replaying every pod on (re)connect

proxy -> agent: ``{"type": "ack", "error": null | "text"}`` for each message, in order.

The encoding/decoding half is pure (bytes in, messages out) so it is tested without
sockets; :class:`ZdsClient` and :class:`ZdsServer` are thin asyncio drivers.
"""
from __future__ import annotations

import array
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol, Union

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_MESSAGE = 64 * 1024  # one JSON object; pods are a few hundred bytes
_FD_SPACE = socket.CMSG_SPACE(array.array("i", [0]).itemsize)


class ZdsError(Exception):
    """The peer answered with an error, the message was malformed, or the link broke."""


# -- messages ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PodInfo:
    uid: str
    namespace: str
    name: str
    ip: str
    service_account: str
    # Every address of the pod, IPv4 first; ``ip`` (the primary) is one of them. An older
    # agent sends only ``ip``: then ``ips == (ip,)``.
    ips: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "ips", tuple(self.ips) or (self.ip,))


@dataclass(frozen=True)
class Hello:
    version: int


@dataclass(frozen=True)
class AddPod:
    pod: PodInfo


@dataclass(frozen=True)
class DelPod:
    uid: str


@dataclass(frozen=True)
class SnapshotSent:
    pass


@dataclass(frozen=True)
class Ack:
    error: str | None


Message = Union[Hello, AddPod, DelPod, SnapshotSent, Ack]


def encode(message: Message) -> bytes:
    if isinstance(message, Hello):
        obj = {"type": "hello", "version": message.version}
    elif isinstance(message, AddPod):
        obj = {"type": "add", **asdict(message.pod)}
    elif isinstance(message, DelPod):
        obj = {"type": "del", "uid": message.uid}
    elif isinstance(message, SnapshotSent):
        obj = {"type": "snapshot_sent"}
    elif isinstance(message, Ack):
        obj = {"type": "ack", "error": message.error}
    else:
        raise TypeError(f"not a ZDS message: {message!r}")
    return json.dumps(obj, separators=(",", ":")).encode()


def _text_field(obj: dict, key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise ZdsError(f"field {key!r} must be a non-empty string")
    return value


def _address(value: str, field: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ZdsError(f"{field} is not an IP address: {value!r}") from None
    return value


def decode(data: bytes) -> Message:
    """Parse one datagram; raise :class:`ZdsError` on anything unexpected."""
    if len(data) > MAX_MESSAGE:
        raise ZdsError(f"message too large ({len(data)} bytes)")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ZdsError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ZdsError("message must be a JSON object")
    kind = obj.get("type")
    if kind == "hello":
        version = obj.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ZdsError("hello.version must be an integer")
        return Hello(version)
    if kind == "add":
        ip = _address(_text_field(obj, "ip"), "add.ip")
        ips = obj.get("ips", [ip])
        if not isinstance(ips, list) or not 1 <= len(ips) <= 2 or ip not in ips:
            raise ZdsError(f"add.ips must list one or two addresses including add.ip, got {ips!r}")
        ips = tuple(_address(a if isinstance(a, str) else repr(a), f"add.ips[{i}]")
                    for i, a in enumerate(ips))
        if len({ipaddress.ip_address(a).version for a in ips}) != len(ips):
            raise ZdsError(f"add.ips must hold at most one address per family, got {list(ips)}")
        return AddPod(PodInfo(
            uid=_text_field(obj, "uid"), namespace=_text_field(obj, "namespace"),
            name=_text_field(obj, "name"), ip=ip,
            service_account=_text_field(obj, "service_account"), ips=ips))
    if kind == "del":
        return DelPod(_text_field(obj, "uid"))
    if kind == "snapshot_sent":
        return SnapshotSent()
    if kind == "ack":
        error = obj.get("error")
        if error is not None and not isinstance(error, str):
            raise ZdsError("ack.error must be null or a string")
        return Ack(error)
    raise ZdsError(f"unknown message type {kind!r}")


# -- socket helpers ---------------------------------------------------------------------------

async def _wait_fd(loop: asyncio.AbstractEventLoop, sock: socket.socket, writable: bool) -> None:
    done = loop.create_future()
    fd = sock.fileno()
    add, remove = (loop.add_writer, loop.remove_writer) if writable else (loop.add_reader, loop.remove_reader)

    def ready() -> None:
        if not done.done():
            done.set_result(None)

    add(fd, ready)
    try:
        await done
    finally:
        remove(fd)


async def send_message(sock: socket.socket, message: Message, fd: int | None = None) -> None:
    payload = encode(message)
    ancillary = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    loop = asyncio.get_running_loop()
    while True:
        try:
            sock.sendmsg([payload], ancillary)
            return
        except BlockingIOError:
            await _wait_fd(loop, sock, writable=True)


async def recv_message(sock: socket.socket) -> tuple[Message, int | None] | None:
    """One message plus the fd that came with it (caller owns it); None at EOF.

    A malformed message raises :class:`ZdsError` after closing any fd it carried.
    """
    loop = asyncio.get_running_loop()
    while True:
        try:
            data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE + 1, _FD_SPACE)
            break
        except BlockingIOError:
            await _wait_fd(loop, sock, writable=False)
    fds: list[int] = []
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(cdata[: len(cdata) - (len(cdata) % arr.itemsize)])
            fds.extend(arr)
    if not data and not fds:
        return None
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ZdsError("message or its ancillary data was truncated")
        if len(fds) > 1:
            raise ZdsError(f"at most one fd per message, got {len(fds)}")
        message = decode(data)
        if fds and not isinstance(message, AddPod):
            raise ZdsError(f"unexpected fd with {type(message).__name__}")
        if isinstance(message, AddPod) and not fds:
            raise ZdsError("add without a network namespace fd")
    except ZdsError:
        for extra in fds:
            os.close(extra)
        raise
    return message, (fds[0] if fds else None)


# -- agent side -------------------------------------------------------------------------------

class ZdsClient:
    """The agent's end: connect, then ``add``/``remove``/``snapshot_sent``, each awaiting its ack.

    After a reconnect the agent replays every pod and then calls ``snapshot_sent``; a
    proxy that restarted (or crashed) thereby learns every enrolled pod again.
    """

    def __init__(self, path: str | os.PathLike, timeout: float = 10.0):
        self.path = str(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._pending: deque[asyncio.Future] = deque()
        self._reader: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # keeps send order == ack order
        self._closed = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self._sock is not None and not self._closed.is_set()

    def fileno(self) -> int:
        """The connected socket's fd (the agent reads the proxy's credentials from it)."""
        if self._sock is None:
            raise ZdsError("not connected")
        return self._sock.fileno()

    async def connect(self) -> None:
        await self.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, self.path)
        except OSError as exc:
            sock.close()
            raise ZdsError(f"cannot connect to {self.path}: {exc}") from exc
        await self.attach(sock)

    async def attach(self, sock: socket.socket) -> None:
        """Speak over an already connected SEQPACKET socket (the node proxy's supervisor
        hands pods to each worker over a socketpair); the client owns it from here."""
        await self.close()
        sock.setblocking(False)
        self._sock = sock
        self._closed = asyncio.Event()
        self._reader = asyncio.create_task(self._read_acks(sock), name="zds-client-reader")
        await self._request(Hello(PROTOCOL_VERSION))

    async def add(self, pod: PodInfo, netns_fd: int) -> None:
        await self._request(AddPod(pod), netns_fd)

    async def remove(self, uid: str) -> None:
        await self._request(DelPod(uid))

    async def snapshot_sent(self) -> None:
        await self._request(SnapshotSent())

    async def wait_closed(self) -> None:
        """Returns when the proxy goes away (so the agent reconnects and replays)."""
        await self._closed.wait()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._fail_pending("connection closed")
        self._closed.set()

    async def __aenter__(self) -> "ZdsClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _request(self, message: Message, fd: int | None = None) -> None:
        sock = self._sock
        if sock is None or not self.connected:
            raise ZdsError("not connected")
        async with self._lock:
            waiter = asyncio.get_running_loop().create_future()
            self._pending.append(waiter)
            try:
                await send_message(sock, message, fd)
            except OSError as exc:
                self._pending.remove(waiter)
                raise ZdsError(f"send failed: {exc}") from exc
        try:
            ack: Ack = await asyncio.wait_for(asyncio.shield(waiter), self.timeout)
        except asyncio.TimeoutError:
            raise ZdsError(f"no ack for {type(message).__name__} within {self.timeout}s") from None
        if ack.error is not None:
            raise ZdsError(ack.error)

    async def _read_acks(self, sock: socket.socket) -> None:
        reason = "proxy closed the connection"
        try:
            while True:
                received = await recv_message(sock)
                if received is None:
                    break
                message, _ = received
                if not isinstance(message, Ack) or not self._pending:
                    reason = f"unexpected message from proxy: {message!r}"
                    break
                waiter = self._pending.popleft()
                if not waiter.done():
                    waiter.set_result(message)
        except (ZdsError, OSError) as exc:
            reason = str(exc)
        self._fail_pending(reason)
        self._closed.set()

    def _fail_pending(self, reason: str) -> None:
        while self._pending:
            waiter = self._pending.popleft()
            if not waiter.done():
                waiter.set_exception(ZdsError(reason))


# -- proxy side -------------------------------------------------------------------------------

class PodHandler(Protocol):
    """What the proxy does with pods. ``add`` owns ``netns_fd`` (close it when done)."""

    async def add_pod(self, pod: PodInfo, netns_fd: int) -> None: ...
    async def remove_pod(self, uid: str) -> None: ...
    async def snapshot_complete(self) -> None: ...


class ZdsServer:
    """The proxy's end: accepts agents, dispatches their messages to a :class:`PodHandler`.

    Errors raised by the handler (``ValueError``/``OSError``/``ZdsError``) become the
    ack's error text; a malformed message gets an error ack and the link is kept.
    """

    def __init__(self, path: str | os.PathLike, handler: PodHandler,
                 on_error: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.handler = handler
        self.on_error = on_error or (lambda reason: None)
        self._listener: socket.socket | None = None
        self._path_inode = 0
        self._accept_task: asyncio.Task | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        # Replace a stale path (a crashed proxy) or an old proxy's path during a restart:
        # the agent notices the old connection ending and reconnects here.
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        sock.bind(str(tmp))
        os.chmod(tmp, 0o600)
        sock.listen(8)
        self._path_inode = os.stat(tmp).st_ino
        os.replace(tmp, self.path)
        self._listener = sock
        self._accept_task = asyncio.create_task(self._accept_loop(sock), name="zds-accept")

    def owns_path(self) -> bool:
        """Whether the ZDS path is still our socket (a successor replaces it to take over)."""
        try:
            return os.stat(self.path).st_ino == self._path_inode
        except FileNotFoundError:
            return False

    async def close(self, unlink: bool = True) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._listener is not None:
            if unlink:
                # Only remove the path if it is still ours (a successor may own it now).
                with contextlib.suppress(OSError):
                    if os.stat(self.path).st_ino == self._path_inode:
                        self.path.unlink()
            self._listener.close()
            self._listener = None

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            self.serve_connection(conn)

    def serve_connection(self, conn: socket.socket) -> asyncio.Task:
        """Serve one connected SEQPACKET socket (accepted here, or a socketpair end handed
        to a worker by the supervisor); it is closed when the peer goes or on ``close``."""
        conn.setblocking(False)
        task = asyncio.create_task(self._serve(conn), name="zds-conn")
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)
        return task

    async def _serve(self, conn: socket.socket) -> None:
        greeted = False
        try:
            while True:
                try:
                    received = await recv_message(conn)
                except ZdsError as exc:
                    self._reject(f"malformed message: {exc}")
                    await send_message(conn, Ack(f"malformed message: {exc}"))
                    continue
                if received is None:
                    return
                message, fd = received
                error = await self._dispatch(message, fd, greeted)
                if isinstance(message, Hello) and error is None:
                    greeted = True
                await send_message(conn, Ack(error))
        except OSError as exc:
            log.info("zds connection ended: %s", exc)
        finally:
            conn.close()

    async def _dispatch(self, message: Message, fd: int | None, greeted: bool) -> str | None:
        try:
            if isinstance(message, Hello):
                if message.version != PROTOCOL_VERSION:
                    return f"unsupported version {message.version}, want {PROTOCOL_VERSION}"
                return None
            if not greeted:
                return "hello first"
            if isinstance(message, AddPod):
                if fd is None:
                    raise ZdsError("add without a network namespace fd")   # recv_message refuses it first
                owned, fd = fd, None
                await self.handler.add_pod(message.pod, owned)
            elif isinstance(message, DelPod):
                await self.handler.remove_pod(message.uid)
            elif isinstance(message, SnapshotSent):
                await self.handler.snapshot_complete()
            else:
                return f"unexpected {type(message).__name__}"
            return None
        except (ValueError, OSError, ZdsError) as exc:
            self._reject(f"{type(message).__name__}: {exc}")
            return str(exc) or type(exc).__name__
        finally:
            if fd is not None:
                os.close(fd)

    def _reject(self, reason: str) -> None:
        log.warning("zds: %s", reason)
        self.on_error(reason)
