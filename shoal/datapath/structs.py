"""ctypes mirrors of bpf/lib/shoal.h, the maps' specs, and the constants both share.

The one place where Python and C meet: the map specs here create the pinned maps,
and the programs receive their fds (agent/loader.py). Byte orders follow the C
comments: IPs and ports that come straight from packets stay in network order.
"""
from __future__ import annotations

import ctypes
import enum
import ipaddress
import socket
from dataclasses import dataclass

from shoal.datapath import bpfsys

IDENTITY_ANY = 0
IDENTITY_HOST = 1
IDENTITY_WORLD = 2

ENDPOINT_MESHED = 0x1
ENDPOINT_LOCAL = 0x2
ENDPOINT_STRICT = 0x4

DROP_INVALID_PACKET = 134
DROP_INVALID_EXTHDR = 156
DROP_FRAGMENT = 157
DROP_NO_BACKEND = 158
DROP_POLICY_DENY = 181
DROP_PROXY_UNAVAILABLE = 182
DROP_AUTH_REQUIRED = 189
DROP_RATE_LIMITED = 198   # Hubble's code; the flow.proto vendored here predates its name

CONFIG_PROXY_CGROUP = 0   # enum shoal_config
CONFIG_PROXY_CGROUP_PREVIOUS = 1
CONFIG_APP_JOIN = 2       # 1: sockops puts same-node app sockets into app_socks (bpf/sk_msg_join.c)
CONFIG_MAX = 3


class Verdict(enum.IntEnum):
    FORWARDED = 1
    DROPPED = 2
    REDIRECTED = 3


class Direction(enum.IntEnum):
    INGRESS = 1
    EGRESS = 2


class Kind(enum.IntEnum):
    CONNECT = 1
    SOCK = 2
    TC = 3


class Counter(enum.IntEnum):
    """Slots of the per-CPU `counters` array (enum shoal_counter)."""
    RINGBUF_LOST = 0
    CONNECT_REDIRECTED = 1
    CONNECT_BALANCED = 2
    CONNECT_DENIED = 3
    CONNECT_SKIPPED_PROXY = 4
    CONNECT_NS = 5
    CONNECT_RUNS = 6
    ORIGDST_RECORDED = 7
    TC_STEERED = 8
    TC_DENIED = 9
    TC_NO_LISTENER = 10
    TC_NS = 11
    TC_RUNS = 12
    SOCKOPS_NS = 13
    SOCKOPS_RUNS = 14
    TC_MALFORMED = 15
    NO_BACKEND = 16
    UDP_BALANCED = 17
    UDP_DENIED = 18
    UDP_REVNAT = 19
    TC_UDP_DENIED = 20
    TC_UDP_STRICT = 21
    TC_HBONE_BOXED = 22


COUNTER_MAX = len(Counter)

COST_BUCKETS = 128   # log2 buckets x 4 linear sub-buckets (bpf/lib/shoal.h)
COST_PROGRAMS = ("connect", "sockops", "tc")   # enum shoal_cost_program order


class Addr(ctypes.Structure):
    """struct shoal_addr: IPv6, or IPv4 as ::ffff:a.b.c.d, in network order."""
    _fields_ = [("b", ctypes.c_uint8 * 16)]

    @classmethod
    def of(cls, ip: str | None) -> "Addr":
        """An address of either family (None: all zero)."""
        if not ip:
            return cls()
        address = ipaddress.ip_address(ip)
        if address.version == 4:
            address = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)
        return cls.from_buffer_copy(address.packed)

    def text(self) -> str:
        """'10.0.0.1' for a mapped address, 'fd00::1' for IPv6, '' for all zero."""
        raw = bytes(self.b)
        if not any(raw):
            return ""
        address = ipaddress.IPv6Address(raw)
        return str(address.ipv4_mapped or address)


def port_to_be16(port: int) -> int:
    return socket.htons(port)


def be16_to_port(value: int) -> int:
    return socket.ntohs(value)


class PodValue(ctypes.Structure):
    """The enrolled_pods map's value (struct pod_info); the pod itself is ``shoal.zds.PodInfo``."""
    _fields_ = [("identity", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("ns_id", ctypes.c_uint32),
                ("pad", ctypes.c_uint32), ("ip4", Addr), ("ip6", Addr)]


class EndpointInfo(ctypes.Structure):
    _fields_ = [("identity", ctypes.c_uint32), ("ns_id", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class SvcKey(ctypes.Structure):
    _fields_ = [("vip", Addr), ("port", ctypes.c_uint16), ("slot", ctypes.c_uint16),
                ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]


class SvcValue(ctypes.Structure):
    _fields_ = [("backend", Addr), ("backend_port", ctypes.c_uint16), ("count", ctypes.c_uint16)]


class PolicyKey(ctypes.Structure):
    _fields_ = [("src_identity", ctypes.c_uint32), ("dst_identity", ctypes.c_uint32),
                ("dport", ctypes.c_uint16), ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


class PolicyValue(ctypes.Structure):
    _fields_ = [("rule_id", ctypes.c_uint32)]


class ListenerKey(ctypes.Structure):
    _fields_ = [("ip", Addr), ("port", ctypes.c_uint32)]


class OrigDst(ctypes.Structure):
    _fields_ = [("ip", Addr), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class OrigDstKey(ctypes.Structure):
    _fields_ = [("cookie", ctypes.c_uint64), ("ip", Addr),
                ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16), ("pad2", ctypes.c_uint32)]


class FlowRecord(ctypes.Structure):
    _fields_ = [("ts_ns", ctypes.c_uint64), ("src_ip", Addr), ("dst_ip", Addr),
                ("src_port", ctypes.c_uint16), ("dst_port", ctypes.c_uint16),
                ("src_identity", ctypes.c_uint32), ("dst_identity", ctypes.c_uint32),
                ("rule_id", ctypes.c_uint32), ("protocol", ctypes.c_uint8), ("verdict", ctypes.c_uint8),
                ("direction", ctypes.c_uint8), ("kind", ctypes.c_uint8), ("tcp_flags", ctypes.c_uint8),
                ("drop_reason", ctypes.c_uint8), ("pad", ctypes.c_uint16)]


class BypassPair(ctypes.Structure):
    """struct bypass_pair: one socket of a same-node bypassed pair (bpf/sk_skb_bypass.c)."""
    _fields_ = [("peer", ctypes.c_uint64), ("bytes", ctypes.c_uint64), ("unredirected", ctypes.c_uint64),
                ("handed_back", ctypes.c_uint64), ("handbacks", ctypes.c_uint64),
                ("peer_seq_base", ctypes.c_uint32), ("state", ctypes.c_uint32)]


# bpf/lib/shoal.h: bytes redirected into a pair's peer and not yet on its socket, past
# which the verdict hands the bytes back to the proxy (TCP flow control then applies)
BYPASS_HIGH_WATER = 4 << 20
BYPASS_REDIRECTING, BYPASS_HANDING_BACK = 1, 2


U64 = ctypes.c_uint64
U32 = ctypes.c_uint32


class AppKey(ctypes.Structure):
    """struct app_key: an app socket of a same-node pair (bpf/sk_msg_join.c): its netns
    cookie, its own and its peer's address (IPv4 as mapped) and ports (host order)."""
    _fields_ = [("netns", ctypes.c_uint64), ("local", Addr), ("remote", Addr),
                ("local_port", ctypes.c_uint16), ("remote_port", ctypes.c_uint16), ("pad", ctypes.c_uint32)]


class AppExpectKey(ctypes.Structure):
    """struct app_expect_key: a server app's connection the proxy is about to dial."""
    _fields_ = [("local", Addr), ("remote", Addr), ("local_port", ctypes.c_uint16),
                ("pad", ctypes.c_uint16), ("pad2", ctypes.c_uint32)]


class AppLink(ctypes.Structure):
    """struct app_link: the proxy socket an app's TCP bytes reach, the one toward the other app,
    and how many bytes the verdict redirected the proxy saw queued on the latter."""
    _fields_ = [("source", ctypes.c_uint64), ("target", ctypes.c_uint64), ("landed", ctypes.c_uint64)]


class AppDirect(ctypes.Structure):
    """struct app_direct: one direction's switch to direct sends (written by the sk_msg program)."""
    _fields_ = [("bytes", ctypes.c_uint64), ("sends", ctypes.c_uint64), ("waits", ctypes.c_uint64),
                ("state", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


DIRECT_OFF, DIRECT_ON, DIRECT_RETIRED = 0, 1, 2


@dataclass(frozen=True)
class MapSpec:
    name: str
    map_type: int
    key_type: type | None
    value_type: type | None
    max_entries: int

    @property
    def key_size(self) -> int:
        return ctypes.sizeof(self.key_type) if self.key_type else 0

    @property
    def value_size(self) -> int:
        return ctypes.sizeof(self.value_type) if self.value_type else 0


RINGBUF_BYTES = 64 * 4096
PENALTY_SOURCES = 4096   # as the userspace box (shoal.hbone.penalty): the oldest forgotten first
BYPASS_SOCKETS = 65536   # two per bypassed connection; a full map falls back to the userspace relay

MAPS: tuple[MapSpec, ...] = (
    MapSpec("enrolled_pods", bpfsys.MAP_TYPE_HASH, U64, PodValue, 4096),
    MapSpec("ipcache", bpfsys.MAP_TYPE_HASH, Addr, EndpointInfo, 65536),
    MapSpec("services", bpfsys.MAP_TYPE_HASH, SvcKey, SvcValue, 65536),
    MapSpec("policy_deny", bpfsys.MAP_TYPE_HASH, PolicyKey, PolicyValue, 65536),
    # LRU: a connect() that never completes leaves its entry behind; LRU bounds that.
    MapSpec("origdst_by_cookie", bpfsys.MAP_TYPE_LRU_HASH, U64, OrigDst, 65536),
    MapSpec("origdst", bpfsys.MAP_TYPE_LRU_HASH, OrigDstKey, OrigDst, 65536),
    # (socket cookie, backend, port) -> the VIP a UDP socket sent to, for recvmsg/getpeername
    MapSpec("udp_revnat", bpfsys.MAP_TYPE_LRU_HASH, OrigDstKey, OrigDst, 65536),
    MapSpec("config", bpfsys.MAP_TYPE_ARRAY, U32, U64, CONFIG_MAX),
    MapSpec("counters", bpfsys.MAP_TYPE_PERCPU_ARRAY, U32, U64, COUNTER_MAX),
    MapSpec("cost_hist", bpfsys.MAP_TYPE_PERCPU_ARRAY, U32, U64, COST_BUCKETS * len(COST_PROGRAMS)),
    MapSpec("flow_events", bpfsys.MAP_TYPE_RINGBUF, None, None, RINGBUF_BYTES),
    # the proxy's in-pod listeners, refreshed by tc, read by sk_lookup (value: socket cookie)
    MapSpec("proxy_listeners", bpfsys.MAP_TYPE_SOCKHASH, ListenerKey, U64, 8192),
    # the same-node bypass: the proxy's paired sockets by socket cookie, and each one's peer
    # (value on update: the socket's fd; on lookup: its cookie)
    MapSpec("bypass_socks", bpfsys.MAP_TYPE_SOCKHASH, U64, U64, BYPASS_SOCKETS),
    # LRU: a proxy that crashed leaves its pairs' entries behind (its sockets leave
    # bypass_socks by themselves); LRU bounds them. An evicted live pair fails closed: its
    # next bytes stay with the proxy, which resets it.
    MapSpec("bypass_pairs", bpfsys.MAP_TYPE_LRU_HASH, U64, BypassPair, BYPASS_SOCKETS),
    # bytes handed back to the proxy that it wrote to the peer itself, per cookie (the proxy
    # writes it, the verdict reads it: see bpf/sk_skb_bypass.c); LRU like bypass_pairs
    MapSpec("bypass_relayed", bpfsys.MAP_TYPE_LRU_HASH, U64, U64, BYPASS_SOCKETS),
    # the same-node app join (bpf/sk_msg_join.c): app sockets (inserted by sockops only),
    # the server-app connections the proxy is dialling, each app socket's link to the
    # pair (the proxy writes it), each direction's switch (the sk_msg program writes it);
    # app_origin: each app socket's first sequence number (sockops writes it)
    MapSpec("app_socks", bpfsys.MAP_TYPE_SOCKHASH, AppKey, U64, BYPASS_SOCKETS),
    MapSpec("app_expected", bpfsys.MAP_TYPE_LRU_HASH, AppExpectKey, U64, 4096),
    MapSpec("app_origin", bpfsys.MAP_TYPE_LRU_HASH, AppKey, U64, BYPASS_SOCKETS),
    MapSpec("app_links", bpfsys.MAP_TYPE_LRU_HASH, AppKey, AppLink, BYPASS_SOCKETS),
    MapSpec("app_direct", bpfsys.MAP_TYPE_LRU_HASH, U64, AppDirect, BYPASS_SOCKETS),
    # 15008's penalty box in the kernel: source address -> until when (CLOCK_MONOTONIC ns,
    # bpf_ktime_get_ns) its SYNs to 15008 are dropped at tc. The node proxy's workers
    # write it when they box a source (shoal/datapath/penaltybox.py); LRU bounds it.
    MapSpec("hbone_boxed", bpfsys.MAP_TYPE_LRU_HASH, Addr, U64, PENALTY_SOURCES),
)
MAP_BY_NAME = {spec.name: spec for spec in MAPS}

# struct name in bpf/lib/shoal.h -> mirror, for the layout test.
C_MIRRORS = {
    "pod_info": PodValue, "endpoint_info": EndpointInfo, "svc_key": SvcKey, "svc_value": SvcValue,
    "policy_key": PolicyKey, "policy_value": PolicyValue, "orig_dst": OrigDst,
    "origdst_key": OrigDstKey, "flow_event": FlowRecord, "listener_key": ListenerKey,
    "shoal_addr": Addr, "bypass_pair": BypassPair, "app_key": AppKey, "app_expect_key": AppExpectKey,
    "app_link": AppLink, "app_direct": AppDirect,
}
