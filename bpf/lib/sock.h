/* The socket-address hooks (connect, sendmsg, recvmsg, getpeername) for both families.
 *
 * Every decision is taken here, once, on struct shoal_addr (IPv6, or IPv4 as mapped).
 * The entry points (connect4.c, connect6.c, ...) only say which family's fields of
 * bpf_sock_addr they read and write (FAMILY_V4: user_ip4; FAMILY_V6: user_ip6, where
 * ::ffff:a.b.c.d is the IPv4 destination of an AF_INET6 socket). So an AF_INET6
 * socket dialling a mapped address takes exactly the IPv4 path: same keys in the same
 * maps, same verdicts, same flow events; only the rewrite is written back in its form.
 *
 * Returning 0 fails the call: EPERM for a DENY, ECONNREFUSED (bpf_set_retval) for a
 * Service without backends, as a kube-proxy-free datapath answers.
 */
#pragma once
#include "helpers.h"

#define FAMILY_V4 4
#define FAMILY_V6 6
#define ERRNO_ECONNREFUSED 111
#define TCP_FLAG_SYN 0x02

#ifndef SHOAL_DENY_SCAN_BACKENDS
#define SHOAL_DENY_SCAN_BACKENDS 16
#endif

static __always_inline struct shoal_addr ctx_user_addr(struct bpf_sock_addr *ctx, int family)
{
    if (family == FAMILY_V4)
        return addr_from_v4(ctx->user_ip4);
    struct shoal_addr a = { .w = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] } };
    return a;
}

/* An AF_INET socket only ever holds mapped addresses here: the agent pairs every VIP
 * with backends of its own family, and captured IPv4 goes to 127.0.0.1. */
static __always_inline void ctx_set_user_addr(struct bpf_sock_addr *ctx, int family, const struct shoal_addr *a,
                                              __u16 port)
{
    if (family == FAMILY_V4) {
        ctx->user_ip4 = a->w[3];
    } else {
        ctx->user_ip6[0] = a->w[0];
        ctx->user_ip6[1] = a->w[1];
        ctx->user_ip6[2] = a->w[2];
        ctx->user_ip6[3] = a->w[3];
    }
    ctx->user_port = port;
}

struct backend_choice {
    struct shoal_addr ip;
    __u16 port;
    __u8 found;     /* a backend was picked */
    __u8 service;   /* dst is a Service VIP:port (found or not) */
};

static __always_inline struct backend_choice pick_backend(const struct shoal_addr *vip, __u16 port, __u8 proto)
{
    struct backend_choice choice = {};
#if SHOAL_SOCKET_LB
    struct svc_key key = { .vip = *vip, .port = port, .slot = 0, .proto = proto };
    struct svc_value *service = bpf_map_lookup_elem(SHOAL_MAP(services), &key);
    if (!service)
        return choice;
    choice.service = 1;
    if (service->count == 0)
        return choice;
    __u16 count_ = service->count;
    if (count_ > SHOAL_MAX_BACKENDS)
        count_ = SHOAL_MAX_BACKENDS;
    key.slot = (bpf_get_prandom_u32() % count_) + 1;
    struct svc_value *backend = bpf_map_lookup_elem(SHOAL_MAP(services), &key);
    if (!backend) {
        choice.service = 0;   /* the agent is shrinking this service right now; leave the VIP */
        return choice;
    }
    choice.ip = backend->backend;
    choice.port = backend->backend_port;
    choice.found = 1;
#endif
    return choice;
}

/* A meshed pod connecting over TCP to a VIP: the proxy picks the backend later, so the
 * connect fails only when every backend denies (the first SHOAL_DENY_SCAN_BACKENDS of
 * them); otherwise the proxy and the destination enforce per backend. Returns the rule id. */
static __always_inline __u32 service_denied(__u32 src_identity, const struct shoal_addr *vip, __u16 port)
{
    struct svc_key key = { .vip = *vip, .port = port, .slot = 0, .proto = IPPROTO_TCP };
    struct svc_value *service = bpf_map_lookup_elem(SHOAL_MAP(services), &key);
    if (!service || service->count == 0)
        return 0;
    __u32 count_ = service->count;
    __u32 rule = 0;
    for (__u32 slot = 1; slot <= SHOAL_DENY_SCAN_BACKENDS; slot++) {
        if (slot > count_)
            break;
        key.slot = slot;
        struct svc_value *backend = bpf_map_lookup_elem(SHOAL_MAP(services), &key);
        if (!backend)
            return 0;
        rule = policy_denied(src_identity, identity_of(&backend->backend), bpf_ntohs(backend->backend_port),
                             IPPROTO_TCP);
        if (!rule)
            return 0;
    }
    return rule;
}

/* A pod's flow event for a socket call; the source address is the pod's address of the
 * destination's family (the socket may not be bound yet). */
static __always_inline void sock_event(struct flow_event *event, struct pod_info *pod, const struct shoal_addr *dst,
                                       __u16 dst_port, __u32 dst_identity, __u8 proto)
{
    event->src_ip = addr_is_v4(dst) ? pod->ip4 : pod->ip6;
    event->dst_ip = *dst;
    event->dst_port = bpf_ntohs(dst_port);
    event->src_identity = pod->identity;
    event->dst_identity = dst_identity;
    event->protocol = proto;
    event->direction = DIRECTION_EGRESS;
    event->kind = KIND_CONNECT;
    event->tcp_flags = proto == IPPROTO_TCP ? TCP_FLAG_SYN : 0;   /* the SYN this connect() is about to send */
}

static __always_inline int refuse(struct flow_event *event, struct pod_info *pod, __u8 reason, __u32 rule)
{
    if (pod) {
        event->verdict = VERDICT_DROPPED;
        event->drop_reason = reason;
        event->rule_id = rule;
        emit_flow(event);
    }
    if (reason == DROP_NO_BACKEND) {
        count(COUNTER_NO_BACKEND, 1);
        bpf_set_retval(-ERRNO_ECONNREFUSED);
    }
    return 0;
}

/* UDP to dst (connect() of a UDP socket, or one sendmsg() of an unconnected one):
 * socket-LB to a backend, with a reverse entry so recvmsg() shows the VIP again; the
 * L4 DENY of a meshed sender. UDP is never tunnelled, so nothing is captured. */
static __always_inline int sock_udp(struct bpf_sock_addr *ctx, int family, struct shoal_addr *dst, __u16 dst_port,
                                    struct pod_info *pod, int connecting)
{
    struct backend_choice backend = pick_backend(dst, dst_port, IPPROTO_UDP);
    struct shoal_addr *target = backend.found ? &backend.ip : dst;
    __u16 target_port = backend.found ? backend.port : dst_port;
    struct flow_event event = {};
    if (pod) {
        __u32 dst_identity = identity_of(target);
        sock_event(&event, pod, dst, dst_port, dst_identity, IPPROTO_UDP);
        __u32 rule = policy_denied(pod->identity, dst_identity, bpf_ntohs(target_port), IPPROTO_UDP);
        if (rule) {
            count(COUNTER_UDP_DENIED, 1);
            return refuse(&event, pod, DROP_POLICY_DENY, rule);
        }
    }
    if (backend.service && !backend.found)
        return refuse(&event, pod, DROP_NO_BACKEND, 0);
    if (backend.found) {
        /* Reverse entry by (socket, backend): written once per socket and backend, not per
         * datagram (looked up first). LRU: a closed socket's entries age out. */
        struct origdst_key key = { .cookie = bpf_get_socket_cookie(ctx), .ip = backend.ip, .port = backend.port };
        struct orig_dst *known = bpf_map_lookup_elem(SHOAL_MAP(udp_revnat), &key);
        if (!known || known->port != dst_port || !addr_equal(&known->ip, dst)) {
            struct orig_dst vip = { .ip = *dst, .port = dst_port };
            bpf_map_update_elem(SHOAL_MAP(udp_revnat), &key, &vip, BPF_ANY);
        }
        ctx_set_user_addr(ctx, family, &backend.ip, backend.port);
        count(connecting ? COUNTER_CONNECT_BALANCED : COUNTER_UDP_BALANCED, 1);
    }
    if (pod && connecting) {
        event.verdict = VERDICT_FORWARDED;   /* one event per connected socket, none per datagram */
        emit_flow(&event);
    }
    return 1;
}

/* 0 when the hooks leave this call alone: the node proxy's own sockets, loopback.
 * Otherwise the destination, and the meshed pod the socket lives in (NULL if none). */
static __always_inline int sock_subject(struct bpf_sock_addr *ctx, int family, struct shoal_addr *dst, __u16 *dst_port,
                                        struct pod_info **pod)
{
    if (from_node_proxy()) {
        count(COUNTER_CONNECT_SKIPPED_PROXY, 1);
        return 0;
    }
    *dst = ctx_user_addr(ctx, family);
    *dst_port = (__u16)ctx->user_port;
    if (addr_is_loopback(dst))
        return 0;
    __u64 netns = bpf_get_netns_cookie(ctx);
    *pod = bpf_map_lookup_elem(SHOAL_MAP(enrolled_pods), &netns);
    return 1;
}

static __always_inline int sock_connect(struct bpf_sock_addr *ctx, int family)
{
    __u64 start = bpf_ktime_get_ns();
    __u8 proto = ctx->protocol;
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        return 1;
    struct shoal_addr dst;
    __u16 dst_port;
    struct pod_info *pod;
    if (!sock_subject(ctx, family, &dst, &dst_port, &pod))
        return 1;
    if (proto == IPPROTO_UDP) {
        int verdict = sock_udp(ctx, family, &dst, dst_port, pod, 1);
        observe_cost(COST_CONNECT, COUNTER_CONNECT_NS, COUNTER_CONNECT_RUNS, start);
        return verdict;
    }

    struct backend_choice backend = pick_backend(&dst, dst_port, IPPROTO_TCP);
    if (pod) {
        struct shoal_addr *target = backend.found ? &backend.ip : &dst;
        __u16 target_port = backend.found ? backend.port : dst_port;
        __u32 dst_identity = identity_of(target);
        __u32 rule = backend.found ? service_denied(pod->identity, &dst, dst_port)
                                   : policy_denied(pod->identity, dst_identity, bpf_ntohs(target_port), IPPROTO_TCP);
        struct flow_event event = {};
        sock_event(&event, pod, &dst, dst_port, dst_identity, IPPROTO_TCP);
        if (rule) {
            count(COUNTER_CONNECT_DENIED, 1);
            return refuse(&event, pod, DROP_POLICY_DENY, rule);
        }
        /* Captured, VIPs included (with or without backends): the proxy routes. */
        __u64 cookie = bpf_get_socket_cookie(ctx);
        struct orig_dst orig = { .ip = dst, .port = dst_port };
        bpf_map_update_elem(SHOAL_MAP(origdst_by_cookie), &cookie, &orig, BPF_ANY);
        struct shoal_addr proxy = addr_proxy_outbound(&dst);
        ctx_set_user_addr(ctx, family, &proxy, bpf_htons(SHOAL_PORT_OUTBOUND));
        event.verdict = VERDICT_REDIRECTED;
        emit_flow(&event);
        count(COUNTER_CONNECT_REDIRECTED, 1);
        observe_cost(COST_CONNECT, COUNTER_CONNECT_NS, COUNTER_CONNECT_RUNS, start);
        return 1;
    }
    if (backend.service && !backend.found) {
        struct flow_event none = {};
        return refuse(&none, 0, DROP_NO_BACKEND, 0);
    }
    if (backend.found) {
        ctx_set_user_addr(ctx, family, &backend.ip, backend.port);
        count(COUNTER_CONNECT_BALANCED, 1);
        observe_cost(COST_CONNECT, COUNTER_CONNECT_NS, COUNTER_CONNECT_RUNS, start);
    }
    return 1;
}

/* sendmsg() with a destination on an unconnected UDP socket (the kernel runs the hook
 * only then: connected sockets were decided at connect()). */
static __always_inline int sock_sendmsg(struct bpf_sock_addr *ctx, int family)
{
    struct shoal_addr dst;
    __u16 dst_port;
    struct pod_info *pod;
    if (!sock_subject(ctx, family, &dst, &dst_port, &pod))
        return 1;
    return sock_udp(ctx, family, &dst, dst_port, pod, 0);
}

/* recvmsg() of a UDP socket: a datagram from a backend this socket sent to through a
 * VIP reads as coming from the VIP, so DNS-style clients that check the source accept it. */
static __always_inline int sock_recvmsg(struct bpf_sock_addr *ctx, int family)
{
    struct origdst_key key = { .cookie = bpf_get_socket_cookie(ctx), .ip = ctx_user_addr(ctx, family),
                               .port = (__u16)ctx->user_port };
    struct orig_dst *vip = bpf_map_lookup_elem(SHOAL_MAP(udp_revnat), &key);
    if (!vip)
        return 1;
    ctx_set_user_addr(ctx, family, &vip->ip, vip->port);
    count(COUNTER_UDP_REVNAT, 1);
    return 1;
}

/* getpeername(): a captured TCP app sees the destination it connected to, not the
 * proxy's 15001; a connected UDP socket sees the VIP, not the backend. */
static __always_inline int sock_getpeername(struct bpf_sock_addr *ctx, int family)
{
    struct shoal_addr peer = ctx_user_addr(ctx, family);
    __u16 port = (__u16)ctx->user_port;
    struct orig_dst *orig;
    if (ctx->protocol == IPPROTO_TCP) {
        struct shoal_addr proxy = addr_proxy_outbound(&peer);
        if (port != bpf_htons(SHOAL_PORT_OUTBOUND) || !addr_equal(&peer, &proxy))
            return 1;
        __u64 cookie = bpf_get_socket_cookie(ctx);
        orig = bpf_map_lookup_elem(SHOAL_MAP(origdst_by_cookie), &cookie);
    } else {
        struct origdst_key key = { .cookie = bpf_get_socket_cookie(ctx), .ip = peer, .port = port };
        orig = bpf_map_lookup_elem(SHOAL_MAP(udp_revnat), &key);
    }
    if (orig)
        ctx_set_user_addr(ctx, family, &orig->ip, orig->port);
    return 1;
}
