/* Shared structs and constants of the Shoal data path.
 *
 * Every struct here has a ctypes mirror in agent/structs.py; keep the two in step
 * (tests/agent/test_structs.py compares the sizes the compiler sees).
 * Fields are laid out without implicit padding so both sides agree byte for byte.
 */
#pragma once

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/in.h>
#include <uapi/linux/pkt_cls.h>

/* Build-time feature flags, passed by the loader with -D (see agent/loader.py). */
#ifndef SHOAL_PIN_DIR
#error "SHOAL_PIN_DIR (the per-node bpffs directory) must be defined by the loader"
#endif
#ifndef SHOAL_PORT_OUTBOUND
#define SHOAL_PORT_OUTBOUND 15001
#endif
#ifndef SHOAL_PORT_INBOUND
#define SHOAL_PORT_INBOUND 15006
#endif
#ifndef SHOAL_PORT_HBONE
#define SHOAL_PORT_HBONE 15008
#endif
#ifndef SHOAL_FLOW_EVENTS
#define SHOAL_FLOW_EVENTS 1
#endif
#ifndef SHOAL_SOCKET_LB
#define SHOAL_SOCKET_LB 1
#endif
#ifndef SHOAL_MAX_BACKENDS
#define SHOAL_MAX_BACKENDS 256
#endif

/* Reserved identities (Cilium's numbering): a source we do not know is "world". */
#define IDENTITY_ANY   0   /* wildcard in policy keys only */
#define IDENTITY_HOST  1
#define IDENTITY_WORLD 2

/* endpoint_info.flags */
#define ENDPOINT_MESHED 0x1
#define ENDPOINT_LOCAL  0x2
#define ENDPOINT_STRICT 0x4   /* PeerAuthentication STRICT: no plaintext from outside the mesh */

/* flow_event.verdict */
#define VERDICT_FORWARDED  1
#define VERDICT_DROPPED    2
#define VERDICT_REDIRECTED 3

/* flow_event.direction */
#define DIRECTION_INGRESS 1
#define DIRECTION_EGRESS  2

/* flow_event.kind */
#define KIND_CONNECT 1
#define KIND_SOCK    2
#define KIND_TC      3

/* Drop reasons, Hubble/Cilium codes where one fits. */
#define DROP_INVALID_PACKET     134 /* IPv4 options, truncated headers */
#define DROP_INVALID_EXTHDR     156 /* an IPv6 extension header we do not walk, or too many of them */
#define DROP_FRAGMENT           157 /* IPv4 or IPv6 fragment: reassembly happens after tc */
#define DROP_NO_BACKEND         158 /* a Service VIP with no backend: ECONNREFUSED */
#define DROP_POLICY_DENY        181 /* an explicit DENY rule matched */
#define DROP_PROXY_UNAVAILABLE  182 /* meshed pod but the proxy's in-pod listener is absent: fail closed */
#define DROP_AUTH_REQUIRED      189 /* STRICT: plaintext UDP from outside the mesh */
#define DROP_RATE_LIMITED       198 /* a SYN to 15008 from a source the node proxy boxed for abuse */

/* config (an array of u64 written by the agent) */
enum shoal_config {
    CONFIG_PROXY_CGROUP = 0,    /* cgroup v2 id of the node proxy: its sockets are never captured */
    CONFIG_PROXY_CGROUP_PREVIOUS, /* the one before a proxy restart moved it (a draining proxy still dials) */
    CONFIG_APP_JOIN,            /* 1: sockops puts same-node app sockets into app_socks (sk_msg_join.c) */
    CONFIG_MAX,
};

/* counters (a per-CPU array, summed by the agent) */
enum shoal_counter {
    COUNTER_RINGBUF_LOST = 0,
    COUNTER_CONNECT_REDIRECTED,
    COUNTER_CONNECT_BALANCED,
    COUNTER_CONNECT_DENIED,
    COUNTER_CONNECT_SKIPPED_PROXY, /* the node proxy's own connect()/sendmsg() (by cgroup) */
    COUNTER_CONNECT_NS,         /* total ns spent in connect4/6 for captured/balanced sockets */
    COUNTER_CONNECT_RUNS,       /* ... and how many such runs */
    COUNTER_ORIGDST_RECORDED,
    COUNTER_TC_STEERED,
    COUNTER_TC_DENIED,
    COUNTER_TC_NO_LISTENER,
    COUNTER_TC_NS,
    COUNTER_TC_RUNS,
    COUNTER_SOCKOPS_NS,
    COUNTER_SOCKOPS_RUNS,
    COUNTER_TC_MALFORMED,       /* dropped: IPv4 options, fragments, truncated headers, IPv6 ext headers we do not walk */
    COUNTER_NO_BACKEND,         /* connect()/sendmsg() to a VIP without backends: ECONNREFUSED */
    COUNTER_UDP_BALANCED,       /* sendmsg() to a VIP rewritten to a backend */
    COUNTER_UDP_DENIED,         /* UDP connect()/sendmsg() refused by a DENY rule */
    COUNTER_UDP_REVNAT,         /* recvmsg() source restored to the VIP */
    COUNTER_TC_UDP_DENIED,      /* inbound UDP dropped by a DENY rule */
    COUNTER_TC_UDP_STRICT,      /* inbound plaintext UDP from outside the mesh dropped under STRICT */
    COUNTER_TC_HBONE_BOXED,     /* SYNs to 15008 dropped: their source is in the node proxy's penalty box */
    COUNTER_MAX,
};

/* cost_hist: per-CPU histogram of in-kernel ns per run, COST_BUCKETS per program:
 * log2 buckets split in 4 linear sub-buckets (about 20% wide). Means lie on a shared,
 * preemptible machine (one descheduled run weighs like a thousand); the agent reports
 * the median and p99 from these buckets. */
#define COST_BUCKETS 128
enum shoal_cost_program {
    COST_CONNECT = 0,
    COST_SOCKOPS,
    COST_TC,
    COST_PROGRAMS,
};

/* An address of either family, network order: IPv6 as is, IPv4 as the mapped
 * ::ffff:a.b.c.d (RFC 4291). One key type for both families, so an AF_INET6 socket
 * dialling ::ffff:a.b.c.d looks up exactly the entries an AF_INET socket dialling
 * a.b.c.d does: same maps, same decisions. */
struct shoal_addr {
    __u32 w[4];
};

/* enrolled_pods: netns cookie -> meshed pod on this node. */
struct pod_info {
    __u32 identity;
    __u32 flags;
    __u32 ns_id;
    __u32 pad;
    struct shoal_addr ip4;   /* mapped; all zero when the pod has no IPv4 */
    struct shoal_addr ip6;   /* all zero when the pod has no IPv6 */
};

/* ipcache: every workload address in the cluster (both families) -> identity. */
struct endpoint_info {
    __u32 identity;
    __u32 ns_id;
    __u32 flags;
    __u32 pad;
};

/* services: (vip, port, protocol, slot). Slot 0 is the service itself (count of
 * backends), slots 1..count are the backends, as Cilium's lb maps: the agent writes
 * the backends before raising the count, and lowers the count before deleting.
 * A service with count 0 exists and has no backend: connect()/sendmsg() get
 * ECONNREFUSED. A backend has the VIP's family (the agent pairs them). */
struct svc_key {
    struct shoal_addr vip;
    __u16 port;      /* network order */
    __u16 slot;
    __u8  proto;     /* IPPROTO_TCP or IPPROTO_UDP */
    __u8  pad[3];
};

struct svc_value {
    struct shoal_addr backend;   /* all zero in slot 0 */
    __u16 backend_port;  /* network order */
    __u16 count;         /* slot 0 only */
};

/* policy_deny: pure-L4 DENY rules. IDENTITY_ANY / port 0 are wildcards. */
struct policy_key {
    __u32 src_identity;
    __u32 dst_identity;
    __u16 dport;     /* host order */
    __u8  proto;
    __u8  pad;
};

struct policy_value {
    __u32 rule_id;   /* crc32 of "<namespace>/<policy name>", for flow events and debug */
};

/* proxy_listeners (a SOCKHASH): the proxy's in-pod listener for (pod IP, port). */
struct listener_key {
    struct shoal_addr ip;
    __u32 port;      /* host order: 15006 or 15008 */
};

/* Original destination of a captured connect(); also the VIP of a UDP reverse entry. */
struct orig_dst {
    struct shoal_addr ip;
    __u16 port;      /* network order */
    __u16 pad;
};

/* origdst: the proxy's accepted socket's peer (the app's socket) -> orig_dst.
 * Keyed with the netns cookie because every pod's loopback is 127.0.0.1.
 * udp_revnat uses the same key with the socket cookie and the backend it was sent to. */
struct origdst_key {
    __u64 cookie;
    struct shoal_addr ip;
    __u16 port;      /* origdst: host order; udp_revnat: network order */
    __u16 pad;
    __u32 pad2;
};

/* One flow event record in the ring buffer. */
struct flow_event {
    __u64 ts_ns;
    struct shoal_addr src_ip;
    struct shoal_addr dst_ip;
    __u16 src_port;      /* host order */
    __u16 dst_port;      /* host order */
    __u32 src_identity;
    __u32 dst_identity;
    __u32 rule_id;
    __u8  protocol;
    __u8  verdict;
    __u8  direction;
    __u8  kind;
    __u8  tcp_flags;
    __u8  drop_reason;
    __u16 pad;
};

/* Same-node bypass (sk_skb_bypass.c): two of the node proxy's own sockets joined in
 * the kernel. bypass_socks (a SOCKHASH) holds them keyed by their socket cookie;
 * bypass_pairs says, per cookie, whose egress its received bytes go to (written by the
 * verdict only, once the proxy created it); bypass_relayed, per cookie, how many of the
 * bytes handed back to the proxy it has written to the peer itself (written by the proxy
 * only: a map value is never written from both sides). Cookies are never reused while
 * the machine runs, so an entry left by a closed socket can never name a new one. */
#ifndef SHOAL_BYPASS_HIGH_WATER
#define SHOAL_BYPASS_HIGH_WATER (4 << 20)   /* bytes redirected to a peer and not yet on its socket */
#endif
/* handed back and not yet relayed by the proxy, beyond the receiving socket's buffer */
#define SHOAL_BYPASS_UNRELAYED_SLACK (4 * SHOAL_BYPASS_HIGH_WATER)

/* bypass_pair.state */
#define BYPASS_UNSTARTED   0   /* no byte seen yet: peer_seq_base not taken */
#define BYPASS_REDIRECTING 1
#define BYPASS_HANDING_BACK 2  /* past the high-water mark: bytes go to the proxy's own socket */

struct bypass_pair {
    __u64 peer;          /* socket cookie of the other socket of the pair */
    __u64 bytes;         /* bytes received on this socket and redirected to the peer */
    __u64 unredirected;  /* skbs the kernel could not redirect (kept for the proxy, which resets the pair) */
    __u64 handed_back;   /* bytes passed to this socket for the proxy to relay (the peer was past the mark) */
    __u64 handbacks;     /* how many times the mark was crossed */
    __u32 peer_seq_base; /* the peer's write_seq when this socket's first byte was seen */
    __u32 state;         /* BYPASS_* */
};

/* Same-node app join (sk_msg_join.c): the two apps' own sockets of a joined pair send
 * straight into the proxy's socket toward the other app, once nothing of that direction
 * is anywhere but on that socket.
 *
 * app_socks (a SOCKHASH, the sk_msg program attached) holds app sockets keyed by app_key;
 * only sockops inserts (the proxy has no descriptor of them): the client app's captured
 * socket whose original destination is a local meshed pod, and the server app's accepted
 * socket whose (local, remote, local port) the proxy announced in app_expected before
 * dialling it. Sockops also records each one's first sequence number (app_origin), so the
 * program knows how many bytes the app ever queued on its own socket. app_links (written
 * by the proxy alone, once it joined the pair): app socket -> the proxy socket its TCP
 * bytes reach (source), the proxy socket toward the other app (target), and how many of
 * the bytes the verdict redirected the proxy has seen queued on the target. app_direct
 * (written by the sk_msg program alone, under the app socket's lock; created zeroed by the
 * proxy), per source cookie: the direction's switch. */
struct app_key {
    __u64 netns;              /* the app socket's netns cookie: every pod has a 127.0.0.1 */
    struct shoal_addr local;  /* the app socket's own address */
    struct shoal_addr remote;
    __u16 local_port;         /* host order */
    __u16 remote_port;        /* host order */
    __u32 pad;
};

struct app_expect_key {
    struct shoal_addr local;  /* the server app's address (its pod IP: one netns on the node) */
    struct shoal_addr remote; /* the address the proxy dials from (the client's, or loopback) */
    __u16 local_port;         /* host order */
    __u16 pad;
    __u32 pad2;
};

struct app_link {
    __u64 source;   /* cookie of the proxy socket the app's TCP bytes reach */
    __u64 target;   /* cookie of the proxy socket toward the other app */
    __u64 landed;   /* of the bytes the verdict redirected from source, how many the proxy saw on target */
};

/* app_direct.state: only ever OFF -> ON -> RETIRED */
#define DIRECT_OFF     0   /* sends take the proxy's path (the verdict) */
#define DIRECT_ON      1   /* sends are redirected to the target's egress */
#define DIRECT_RETIRED 2   /* the app's socket became non-blocking, or the target left: the proxy's path for good */

struct app_direct {
    __u64 bytes;    /* bytes of sends redirected (as asked: a send may come back short) */
    __u64 sends;    /* sends redirected */
    __u64 waits;    /* sends passed while off because the proxy's path still held bytes */
    __u32 state;    /* DIRECT_* */
    __u32 pad;
};
