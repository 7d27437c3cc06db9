/* tc ingress on eth0 inside a meshed pod's network namespace, both families.
 *
 * TCP: every packet that does not belong to an existing connection goes to the node
 * proxy's in-pod listener, whatever its source address or port, so nothing reaches
 * the app around the proxy. HBONE (15008) stays on 15008; everything else goes to
 * 15006. A packet of an established connection (lookup by its own 4-tuple finds a
 * non-listening socket) is left to the stack: those are the proxy's own connections
 * and connections accepted before enrolment. A lookup that finds a LISTEN socket (the
 * app's, or the proxy's 15006 hit directly) is steered like any new connection; a SYN
 * reusing a TIME_WAIT tuple is handed to sk_lookup.c (see there). Inbound L4 DENY
 * drops the SYN, and so does the node proxy's penalty box for a SYN to 15008.
 *
 * UDP is not tunnelled (nor proxied): it reaches the app, after the L4 DENY and, for a
 * STRICT destination, only from a meshed source (plaintext UDP from outside the mesh
 * is dropped), unless it answers a socket the pod connected to that very peer.
 *
 * What we cannot parse is dropped, counted and reported, never passed: IPv4 options,
 * truncated headers, fragments (reassembly happens after tc, where neither our socket
 * assignment nor our checks would hold), and IPv6 extension headers beyond
 * IPV6_MAX_EXTHDRS or of a kind we do not walk (ESP, AH, mobility, ...). Hop-by-hop,
 * routing and destination options are walked: TCP or UDP behind them is handled as
 * without them. Other protocols (ICMP, ICMPv6 with NDP and MLD) pass.
 */
#include "lib/helpers.h"

#define ETH_HLEN_ 14
#define IPV6_HLEN_ 40
#define TCP_SYN 0x02
#define TCP_ACK 0x10
#define UDP_CONNECTED 1   /* a connected UDP socket's sk_state (TCP_ESTABLISHED) */

#define NEXTHDR_HOP      0
#define NEXTHDR_ROUTING  43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_DEST     60
#define IPV6_MAX_EXTHDRS 4

/* What tc needs of a packet, whatever its family. */
struct l4_packet {
    struct shoal_addr src;
    struct shoal_addr dst;
    __u32 l4_offset;
    __u8 proto;
    __u8 family;        /* 4 or 6 */
    __u8 drop_reason;   /* set: malformed, dropped before any lookup */
    __u8 pad;
};

/* Skip hop-by-hop, routing and destination options headers (bounded); anything else
 * that is an extension header is a reason to drop. Leaves *nexthdr at the upper layer. */
static __always_inline __u8 ipv6_skip_exthdrs(struct __sk_buff *skb, __u8 *nexthdr, __u32 *offset)
{
    for (int i = 0; i < IPV6_MAX_EXTHDRS; i++) {
        __u8 next = *nexthdr;
        if (next == NEXTHDR_FRAGMENT)
            return DROP_FRAGMENT;
        if (next != NEXTHDR_HOP && next != NEXTHDR_ROUTING && next != NEXTHDR_DEST)
            break;
        __u8 hdr[2];   /* next header, length in 8-octet units not counting the first 8 */
        if (bpf_skb_load_bytes(skb, *offset, hdr, sizeof(hdr)))
            return DROP_INVALID_EXTHDR;
        *nexthdr = hdr[0];
        *offset += ((__u32)hdr[1] + 1) * 8;
    }
    switch (*nexthdr) {
    case IPPROTO_TCP: case IPPROTO_UDP: case IPPROTO_ICMPV6: case 59 /* no next header */:
        return 0;
    case NEXTHDR_FRAGMENT:
        return DROP_FRAGMENT;
    case NEXTHDR_HOP: case NEXTHDR_ROUTING: case NEXTHDR_DEST:   /* more than IPV6_MAX_EXTHDRS */
    case 50 /* ESP */: case 51 /* AH */: case 135 /* mobility */: case 139 /* HIP */: case 140 /* shim6 */:
    case 253: case 254:   /* experimental */
        return DROP_INVALID_EXTHDR;
    }
    return 0;
}

static __always_inline struct bpf_sock *lookup_tcp(struct __sk_buff *skb, struct bpf_sock_tuple *tuple, __u8 family,
                                                   int full_socket)
{
    if (family == 4)
        return full_socket ? bpf_sk_lookup_tcp(skb, tuple, sizeof(tuple->ipv4), BPF_F_CURRENT_NETNS, 0)
                           : bpf_skc_lookup_tcp(skb, tuple, sizeof(tuple->ipv4), BPF_F_CURRENT_NETNS, 0);
    return full_socket ? bpf_sk_lookup_tcp(skb, tuple, sizeof(tuple->ipv6), BPF_F_CURRENT_NETNS, 0)
                       : bpf_skc_lookup_tcp(skb, tuple, sizeof(tuple->ipv6), BPF_F_CURRENT_NETNS, 0);
}

static __always_inline void set_tuple(struct bpf_sock_tuple *tuple, struct l4_packet *pkt, __u16 sport, __u16 dport)
{
    if (pkt->family == 4) {
        tuple->ipv4.saddr = pkt->src.w[3];
        tuple->ipv4.daddr = pkt->dst.w[3];
        tuple->ipv4.sport = sport;
        tuple->ipv4.dport = dport;
    } else {
        __builtin_memcpy(tuple->ipv6.saddr, pkt->src.w, 16);
        __builtin_memcpy(tuple->ipv6.daddr, pkt->dst.w, 16);
        tuple->ipv6.sport = sport;
        tuple->ipv6.dport = dport;
    }
}

static __always_inline struct bpf_sock *listener(struct __sk_buff *skb, struct l4_packet *pkt, __u16 sport, __u16 port)
{
    struct bpf_sock_tuple probe = {};
    set_tuple(&probe, pkt, sport, bpf_htons(port));
    /* a full socket (listeners are), so it can also go into the proxy_listeners sockhash */
    struct bpf_sock *sk = lookup_tcp(skb, &probe, pkt->family, 1);
    if (!sk)
        return 0;
    if (sk->state != BPF_TCP_LISTEN) {
        bpf_sk_release(sk);
        return 0;
    }
    return sk;
}

static __always_inline void packet_event(struct flow_event *event, struct l4_packet *pkt)
{
    event->src_ip = pkt->src;
    event->dst_ip = pkt->dst;
    event->protocol = pkt->proto;
    event->direction = DIRECTION_INGRESS;
    event->kind = KIND_TC;
}

static __always_inline int drop(struct flow_event *event, __u8 reason, __u32 rule, __u32 counter)
{
    event->verdict = VERDICT_DROPPED;
    event->drop_reason = reason;
    event->rule_id = rule;
    emit_flow(event);
    count(counter, 1);
    return TC_ACT_SHOT;
}

static __always_inline int tc_udp(struct __sk_buff *skb, struct l4_packet *pkt)
{
    struct udphdr udp;
    struct flow_event event = {};
    packet_event(&event, pkt);
    if (bpf_skb_load_bytes(skb, pkt->l4_offset, &udp, sizeof(udp)))
        return drop(&event, DROP_INVALID_PACKET, 0, COUNTER_TC_MALFORMED);
    event.src_port = bpf_ntohs(udp.source);
    event.dst_port = bpf_ntohs(udp.dest);
    struct endpoint_info *src = endpoint_of(&pkt->src);
    struct endpoint_info *dst = endpoint_of(&pkt->dst);
    event.src_identity = src ? src->identity : IDENTITY_WORLD;
    event.dst_identity = dst ? dst->identity : IDENTITY_WORLD;
    __u32 rule = policy_denied(event.src_identity, event.dst_identity, event.dst_port, IPPROTO_UDP);
    int strict = dst && (dst->flags & ENDPOINT_STRICT) && !(src && (src->flags & ENDPOINT_MESHED));
    if (!rule && !strict)
        return TC_ACT_OK;
    /* A reply to a socket the pod connected to this peer (its resolver, say) is the
     * pod's own conversation, as an established TCP connection is: it passes. Looked up
     * only when the datagram would otherwise drop. */
    struct bpf_sock_tuple tuple = {};
    set_tuple(&tuple, pkt, udp.source, udp.dest);
    struct bpf_sock *sk = pkt->family == 4
        ? bpf_sk_lookup_udp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0)
        : bpf_sk_lookup_udp(skb, &tuple, sizeof(tuple.ipv6), BPF_F_CURRENT_NETNS, 0);
    if (sk) {
        __u32 state = sk->state;
        bpf_sk_release(sk);
        if (state == UDP_CONNECTED)
            return TC_ACT_OK;
    }
    if (rule)
        return drop(&event, DROP_POLICY_DENY, rule, COUNTER_TC_UDP_DENIED);
    return drop(&event, DROP_AUTH_REQUIRED, 0, COUNTER_TC_UDP_STRICT);
}

static __always_inline int tc_tcp(struct __sk_buff *skb, struct l4_packet *pkt)
{
    struct tcphdr tcp;
    struct flow_event event = {};
    packet_event(&event, pkt);
    if (bpf_skb_load_bytes(skb, pkt->l4_offset, &tcp, sizeof(tcp)))
        return drop(&event, DROP_INVALID_PACKET, 0, COUNTER_TC_MALFORMED);

    __u64 start = bpf_ktime_get_ns();
    struct bpf_sock_tuple tuple = {};
    set_tuple(&tuple, pkt, tcp.source, tcp.dest);

    __u8 flags = ((__u8 *)&tcp)[13];
    __u16 dport = bpf_ntohs(tcp.dest);
    int is_syn = (flags & TCP_SYN) && !(flags & TCP_ACK);
    event.src_port = bpf_ntohs(tcp.source);
    event.dst_port = dport;
    event.tcp_flags = flags;

    int time_wait_syn = 0;
    struct bpf_sock *sk = lookup_tcp(skb, &tuple, pkt->family, 0);
    if (sk) {
        __u32 state = sk->state;
        bpf_sk_release(sk);
        if (state == BPF_TCP_TIME_WAIT && is_syn)
            time_wait_syn = 1;       /* see the sk_lookup hand-off below */
        else if (state != BPF_TCP_LISTEN)
            return TC_ACT_OK;
    }
    if (is_syn) {
        event.src_identity = identity_of(&pkt->src);
        event.dst_identity = identity_of(&pkt->dst);
        /* A source the node proxy boxed for abuse on 15008 (failed handshakes, HTTP/2
         * floods) is refused here, not at accept: a reconnect loop refused at accept
         * costs the proxy an accept and a reset, and the node a handshake, per attempt,
         * thousands a second; a dropped SYN costs one lookup, and the sender's own
         * retransmit backoff slows it down. Connections already open are left alone. */
        if (dport == SHOAL_PORT_HBONE && hbone_source_boxed(&pkt->src))
            return drop(&event, DROP_RATE_LIMITED, 0, COUNTER_TC_HBONE_BOXED);
        __u32 rule = policy_denied(event.src_identity, event.dst_identity, dport, IPPROTO_TCP);
        if (rule)
            return drop(&event, DROP_POLICY_DENY, rule, COUNTER_TC_DENIED);
    }

    __u16 target = dport == SHOAL_PORT_HBONE ? SHOAL_PORT_HBONE : SHOAL_PORT_INBOUND;
    struct bpf_sock *proxy = listener(skb, pkt, tcp.source, target);
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
        struct listener_key key = { .ip = pkt->dst, .port = target };
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

int shoal_tc_ingress(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return TC_ACT_OK;
    struct l4_packet pkt = {};
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > data_end)
            return TC_ACT_OK;
        if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
            return TC_ACT_OK;
        pkt.family = 4;
        pkt.proto = ip->protocol;
        pkt.src = addr_from_v4(ip->saddr);
        pkt.dst = addr_from_v4(ip->daddr);
        pkt.l4_offset = ETH_HLEN_ + sizeof(struct iphdr);
        /* IP options and fragments: classic evasion tricks (TCP sets DF anyway). */
        if (ip->ihl != 5)
            pkt.drop_reason = DROP_INVALID_PACKET;
        else if (ip->frag_off & bpf_htons(0x3fff))
            pkt.drop_reason = DROP_FRAGMENT;
    } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > data_end)
            return TC_ACT_OK;
        pkt.family = 6;
        __builtin_memcpy(pkt.src.w, ip6->saddr.in6_u.u6_addr32, 16);
        __builtin_memcpy(pkt.dst.w, ip6->daddr.in6_u.u6_addr32, 16);
        __u8 next = ip6->nexthdr;
        __u32 offset = ETH_HLEN_ + IPV6_HLEN_;
        pkt.drop_reason = ipv6_skip_exthdrs(skb, &next, &offset);
        if (!pkt.drop_reason && next != IPPROTO_TCP && next != IPPROTO_UDP)
            return TC_ACT_OK;
        pkt.proto = next;
        pkt.l4_offset = offset;
    } else {
        return TC_ACT_OK;
    }
    if (pkt.drop_reason) {
        struct flow_event event = {};
        packet_event(&event, &pkt);
        return drop(&event, pkt.drop_reason, 0, COUNTER_TC_MALFORMED);
    }
    if (pkt.proto == IPPROTO_UDP)
        return tc_udp(skb, &pkt);
    return tc_tcp(skb, &pkt);
}
