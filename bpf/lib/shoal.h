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
#include <uapi/linux/tcp.h>
#include <uapi/linux/in.h>
#include <uapi/linux/pkt_cls.h>

/* Build-time feature flags, passed by the loader with -D (see agent/loader.py). */
#ifndef SHOAL_PIN_DIR
#error "SHOAL_PIN_DIR (the per-node bpffs directory) must be defined by the loader"
#endif
#ifndef SHOAL_PROXY_MARK
#define SHOAL_PROXY_MARK 0x539
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
#define DROP_POLICY_DENY        181 /* an explicit DENY rule matched */
#define DROP_PROXY_UNAVAILABLE  182 /* meshed pod but the proxy's in-pod listener is absent: fail closed */

/* counters (a per-CPU array, summed by the agent) */
enum shoal_counter {
    COUNTER_RINGBUF_LOST = 0,
    COUNTER_CONNECT_REDIRECTED,
    COUNTER_CONNECT_BALANCED,
    COUNTER_CONNECT_DENIED,
    COUNTER_CONNECT_SKIPPED_MARK,
    COUNTER_CONNECT_NS,         /* total ns spent in connect4 for captured/balanced sockets */
    COUNTER_CONNECT_RUNS,       /* ... and how many such runs */
    COUNTER_ORIGDST_RECORDED,
    COUNTER_TC_STEERED,
    COUNTER_TC_DENIED,
    COUNTER_TC_NO_LISTENER,
    COUNTER_TC_NS,
    COUNTER_TC_RUNS,
    COUNTER_SOCKOPS_NS,
    COUNTER_SOCKOPS_RUNS,
    COUNTER_TC_MALFORMED,       /* dropped: IPv4 options, fragments, truncated TCP, TCP over IPv6 */
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

/* enrolled_pods: netns cookie -> meshed pod on this node. */
struct pod_info {
    __u32 identity;
    __u32 ip;        /* network byte order */
    __u32 flags;
    __u32 ns_id;
};

/* ipcache: IPv4 (network order) -> every workload in the cluster. */
struct endpoint_info {
    __u32 identity;
    __u32 ns_id;
    __u32 flags;
    __u32 pad;
};

/* services: (vip, port, slot). Slot 0 is the service itself (count of backends),
 * slots 1..count are the backends, as Cilium's lb4 maps: the agent writes the
 * backends before raising the count, and lowers the count before deleting. */
struct svc_key {
    __u32 vip;       /* network order */
    __u16 port;      /* network order */
    __u16 slot;
};

struct svc_value {
    __u32 backend_ip;    /* network order; 0 in slot 0 */
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
    __u32 ip;        /* network order */
    __u32 port;      /* host order: 15006 or 15008 */
};

/* Original destination of a captured connect(). */
struct orig_dst {
    __u32 ip;        /* network order */
    __u16 port;      /* network order */
    __u16 pad;
};

/* origdst: the proxy's accepted socket's peer (the app's socket) -> orig_dst.
 * Keyed with the netns cookie because every pod's loopback is 127.0.0.1. */
struct origdst_key {
    __u64 netns_cookie;
    __u32 ip;        /* network order */
    __u16 port;      /* host order */
    __u16 pad;
};

/* One flow event record in the ring buffer. */
struct flow_event {
    __u64 ts_ns;
    __u32 src_ip;        /* network order */
    __u32 dst_ip;        /* network order */
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
