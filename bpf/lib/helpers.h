/* Helpers shared by the attach points: counters, flow events, identity and policy lookups. */
#pragma once
#include "maps.h"

static __always_inline void count(__u32 which, __u64 delta)
{
    __u64 *value = bpf_map_lookup_elem(SHOAL_MAP(counters), &which);
    if (value)
        *value += delta;  /* per-CPU slot: no atomics needed */
}

/* Account one run's cost: the mean (sum + runs counters) and the log2 histogram. */
static __always_inline void observe_cost(__u32 program, __u32 ns_counter, __u32 runs_counter, __u64 started)
{
    __u64 ns = bpf_ktime_get_ns() - started;
    count(ns_counter, ns);
    count(runs_counter, 1);
    /* bcc's bpf_log2l() is floor(log2(v)) + 1 (its histograms keep 0 apart) */
    __u32 log2 = bpf_log2l(ns);
    log2 = log2 ? log2 - 1 : 0;
    if (log2 > 31)
        log2 = 31;
    __u32 bucket = log2 < 2 ? (__u32)ns : log2 * 4 + (__u32)((ns >> (log2 - 2)) & 3);
    if (bucket >= COST_BUCKETS)
        bucket = COST_BUCKETS - 1;
    __u32 slot = program * COST_BUCKETS + bucket;
    __u64 *value = bpf_map_lookup_elem(SHOAL_MAP(cost_hist), &slot);
    if (value)
        *value += 1;
}

static __always_inline void emit_flow(struct flow_event *event)
{
#if SHOAL_FLOW_EVENTS
    event->ts_ns = bpf_ktime_get_ns();
    /* A full ring buffer must never stall the data path: drop the record and count it. */
    if (bpf_ringbuf_output(SHOAL_MAP(flow_events), event, sizeof(*event), 0) != 0)
        count(COUNTER_RINGBUF_LOST, 1);
#endif
}

/* -- addresses of both families (struct shoal_addr, see shoal.h) */

#define V4_MAPPED_PREFIX 0x0000ffff  /* w[2] of ::ffff:a.b.c.d, host order */

static __always_inline struct shoal_addr addr_from_v4(__u32 ip4)
{
    struct shoal_addr a = { .w = { 0, 0, bpf_htonl(V4_MAPPED_PREFIX), ip4 } };
    return a;
}

static __always_inline int addr_is_v4(const struct shoal_addr *a)
{
    return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == bpf_htonl(V4_MAPPED_PREFIX);
}

static __always_inline int addr_equal(const struct shoal_addr *a, const struct shoal_addr *b)
{
    return a->w[0] == b->w[0] && a->w[1] == b->w[1] && a->w[2] == b->w[2] && a->w[3] == b->w[3];
}

/* 127.0.0.0/8 (also as ::ffff:127.x.y.z) or ::1: the pod's own loopback. */
static __always_inline int addr_is_loopback(const struct shoal_addr *a)
{
    if (addr_is_v4(a))
        return (bpf_ntohl(a->w[3]) & 0xff000000) == 0x7f000000;
    return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == 0 && a->w[3] == bpf_htonl(1);
}

/* Where a captured connect() goes: the proxy's in-pod outbound listener, on the
 * loopback of the destination's family (127.0.0.1 as mapped for IPv4, ::1 for IPv6). */
static __always_inline struct shoal_addr addr_proxy_outbound(const struct shoal_addr *dst)
{
    if (addr_is_v4(dst))
        return addr_from_v4(bpf_htonl(0x7f000001));
    struct shoal_addr loopback6 = { .w = { 0, 0, 0, bpf_htonl(1) } };
    return loopback6;
}

/* The node proxy's own sockets are never captured, balanced or denied. Keyed on the
 * cgroup of the task calling connect()/sendmsg() (the agent stores the proxy's cgroup
 * id in the config map): a socket mark is a value any CAP_NET_ADMIN process can set,
 * a cgroup is placed by the node (kubelet / local cluster), not by the pod. */
static __always_inline int from_node_proxy(void)
{
    __u64 caller = bpf_get_current_cgroup_id();
    __u32 slot = CONFIG_PROXY_CGROUP;
    __u64 *proxy = bpf_map_lookup_elem(SHOAL_MAP(config), &slot);
    if (proxy && *proxy == caller)
        return 1;
    slot = CONFIG_PROXY_CGROUP_PREVIOUS;
    proxy = bpf_map_lookup_elem(SHOAL_MAP(config), &slot);
    return proxy && *proxy == caller;
}

static __always_inline struct endpoint_info *endpoint_of(const struct shoal_addr *ip)
{
    return bpf_map_lookup_elem(SHOAL_MAP(ipcache), (void *)ip);
}

static __always_inline __u32 identity_of(const struct shoal_addr *ip)
{
    struct endpoint_info *endpoint = endpoint_of(ip);
    return endpoint ? endpoint->identity : IDENTITY_WORLD;
}

/* Whether the node proxy boxed ``src`` for abuse on 15008 and the box has not expired
 * (hbone_boxed: until when, bpf_ktime_get_ns, written by the proxy from CLOCK_MONOTONIC). */
static __always_inline int hbone_source_boxed(const struct shoal_addr *src)
{
    __u64 *until = bpf_map_lookup_elem(SHOAL_MAP(hbone_boxed), (void *)src);
    return until && bpf_ktime_get_ns() < *until;
}

static __always_inline __u32 deny_rule(struct policy_key *key)
{
    struct policy_value *hit = bpf_map_lookup_elem(SHOAL_MAP(policy_deny), key);
    return hit ? hit->rule_id : 0;
}

/* Deny lookups from the most to the least specific key; returns the rule id, or 0. */
static __always_inline __u32 policy_denied(__u32 src, __u32 dst, __u16 dport, __u8 proto)
{
    struct policy_key key = { .src_identity = src, .dst_identity = dst, .dport = dport, .proto = proto };
    __u32 rule = deny_rule(&key);
    if (rule)
        return rule;
    key.dport = 0;
    rule = deny_rule(&key);
    if (rule)
        return rule;
    key.src_identity = IDENTITY_ANY;
    key.dport = dport;
    rule = deny_rule(&key);
    if (rule)
        return rule;
    key.dport = 0;
    return deny_rule(&key);
}
