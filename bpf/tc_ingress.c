/* tc ingress on eth0 inside a meshed pod's network namespace: every TCP packet that
 * does not belong to an existing connection goes to the node proxy's in-pod
 * listener, whatever its source address or port, so nothing reaches the app around
 * the proxy. HBONE (15008) stays on 15008; everything else goes to 15006.
 *
 * A packet of an established connection (lookup by its own 4-tuple finds a non-
 * listening socket) is left to the stack: those are the proxy's own connections and
 * connections accepted before enrolment. A lookup that finds a LISTEN socket (the
 * app's, or the proxy's 15006 hit directly) is steered like any new connection; a SYN
 * reusing a TIME_WAIT tuple is handed to sk_lookup.c (see there).
 */
#include "lib/helpers.h"

#define ETH_HLEN_ 14
#define TCP_SYN 0x02
#define TCP_ACK 0x10

static __always_inline struct bpf_sock *listener(struct __sk_buff *skb, struct bpf_sock_tuple *tuple, __u16 port)
{
    struct bpf_sock_tuple probe = *tuple;
    probe.ipv4.dport = bpf_htons(port);
    /* a full socket (listeners are), so it can also go into the proxy_listeners sockhash */
    struct bpf_sock *sk = bpf_sk_lookup_tcp(skb, &probe, sizeof(probe.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return 0;
    if (sk->state != BPF_TCP_LISTEN) {
        bpf_sk_release(sk);
        return 0;
    }
    return sk;
}

int shoal_tc_ingress(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return TC_ACT_OK;
    if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        /* Pods are IPv4-only here: refuse TCP over IPv6 rather than let it bypass. */
        struct ipv6hdr_min { __u32 vtc; __u16 len; __u8 nexthdr; __u8 hop; } *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > data_end)
            return TC_ACT_OK;
        if (ip6->nexthdr != IPPROTO_TCP)
            return TC_ACT_OK;
        count(COUNTER_TC_MALFORMED, 1);
        return TC_ACT_SHOT;
    }
    if (eth->h_proto != bpf_htons(ETH_P_IP))
        return TC_ACT_OK;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end)
        return TC_ACT_OK;
    if (ip->protocol != IPPROTO_TCP)
        return TC_ACT_OK;
    /* IP options and fragments: classic evasion tricks. A fragment has no (or a partial)
     * TCP header here, and reassembly happens after tc, where our socket assignment
     * would not survive: a fragmented SYN could reach the app. TCP sets DF anyway. */
    struct tcphdr *tcp = (void *)(ip + 1);
    if (ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3fff)) || (void *)(tcp + 1) > data_end) {
        count(COUNTER_TC_MALFORMED, 1);
        return TC_ACT_SHOT;
    }

    __u64 start = bpf_ktime_get_ns();
    struct bpf_sock_tuple tuple = {};
    tuple.ipv4.saddr = ip->saddr;
    tuple.ipv4.daddr = ip->daddr;
    tuple.ipv4.sport = tcp->source;
    tuple.ipv4.dport = tcp->dest;

    __u8 flags = ((__u8 *)tcp)[13];
    __u16 dport = bpf_ntohs(tcp->dest);
    int is_syn = (flags & TCP_SYN) && !(flags & TCP_ACK);

    int time_wait_syn = 0;
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (sk) {
        __u32 state = sk->state;
        bpf_sk_release(sk);
        if (state == BPF_TCP_TIME_WAIT && is_syn)
            time_wait_syn = 1;       /* see the sk_lookup hand-off below */
        else if (state != BPF_TCP_LISTEN)
            return TC_ACT_OK;
    }
    struct flow_event event = {
        .src_ip = ip->saddr, .dst_ip = ip->daddr,
        .src_port = bpf_ntohs(tcp->source), .dst_port = dport,
        .protocol = IPPROTO_TCP, .direction = DIRECTION_INGRESS, .kind = KIND_TC,
        .tcp_flags = flags,
    };
    if (is_syn) {
        event.src_identity = identity_of(ip->saddr);
        event.dst_identity = identity_of(ip->daddr);
        __u32 rule = policy_denied(event.src_identity, event.dst_identity, dport, IPPROTO_TCP);
        if (rule) {
            event.verdict = VERDICT_DROPPED;
            event.drop_reason = DROP_POLICY_DENY;
            event.rule_id = rule;
            emit_flow(&event);
            count(COUNTER_TC_DENIED, 1);
            return TC_ACT_SHOT;
        }
    }

    __u16 target = dport == SHOAL_PORT_HBONE ? SHOAL_PORT_HBONE : SHOAL_PORT_INBOUND;
    struct bpf_sock *proxy = listener(skb, &tuple, target);
    if (!proxy) {
        /* Enrolled but the proxy has not opened (or has closed) its listener: fail closed. */
        if (is_syn) {
            event.verdict = VERDICT_DROPPED;
            event.drop_reason = DROP_PROXY_UNAVAILABLE;
            emit_flow(&event);
        }
        count(COUNTER_TC_NO_LISTENER, 1);
        return TC_ACT_SHOT;
    }
    long err;
    if (time_wait_syn) {
        /* The stack would refuse a connection on our listener next to a TIME_WAIT with the
         * same tuple; its TIME_WAIT path recycles the tuple and then asks sk_lookup (linked
         * in this namespace) for a listener, which answers with the entry written here
         * (only here: a sockhash update costs more than the rest of a SYN's work). */
        struct listener_key key = { .ip = ip->daddr, .port = target };
        err = bpf_map_update_elem(SHOAL_MAP(proxy_listeners), &key, proxy, BPF_ANY);
        bpf_sk_release(proxy);
        if (err)
            return TC_ACT_SHOT;
        event.verdict = VERDICT_REDIRECTED;
        emit_flow(&event);
        count(COUNTER_TC_STEERED, 1);
        return TC_ACT_OK;
    }
    err = bpf_sk_assign(skb, proxy, 0);
    bpf_sk_release(proxy);
    if (err)
        return TC_ACT_SHOT;
    if (is_syn) {
        event.verdict = VERDICT_REDIRECTED;
        emit_flow(&event);
        count(COUNTER_TC_STEERED, 1);
    }
    observe_cost(COST_TC, COUNTER_TC_NS, COUNTER_TC_RUNS, start);
    return TC_ACT_OK;
}
