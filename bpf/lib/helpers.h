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

static __always_inline __u32 identity_of(__u32 ip)
{
    struct endpoint_info *endpoint = bpf_map_lookup_elem(SHOAL_MAP(ipcache), &ip);
    return endpoint ? endpoint->identity : IDENTITY_WORLD;
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
