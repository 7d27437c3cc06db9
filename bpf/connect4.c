/* cgroup/connect4 on the node's root cgroup: service socket-LB for every pod, and
 * outbound capture for meshed pods.
 *
 * Runs once per connect(), not per packet. For a socket in a meshed pod (its netns
 * cookie is in enrolled_pods) a TCP connect is rewritten to the node proxy's in-pod
 * outbound listener, after recording the original destination by socket cookie;
 * sockops re-keys it by 4-tuple once the source port exists. Any other socket
 * connecting to a Service VIP is rewritten to one backend, as kube-proxy-free Cilium.
 * Returning 0 fails the connect() with EPERM at once: that is how L4 DENY surfaces.
 */
#include "lib/helpers.h"

#define LOOPBACK_NET 0x7f000000  /* 127.0.0.0/8, host order */
#define SOCK_STREAM_TYPE 1

struct backend_choice {
    __u32 ip;
    __u16 port;
    __u16 found;
};

static __always_inline struct backend_choice pick_backend(__u32 vip, __u16 port)
{
    struct backend_choice choice = {};
#if SHOAL_SOCKET_LB
    struct svc_key key = { .vip = vip, .port = port, .slot = 0 };
    struct svc_value *service = bpf_map_lookup_elem(SHOAL_MAP(services), &key);
    if (!service || service->count == 0)
        return choice;
    __u16 count_ = service->count;
    if (count_ > SHOAL_MAX_BACKENDS)
        count_ = SHOAL_MAX_BACKENDS;
    key.slot = (bpf_get_prandom_u32() % count_) + 1;
    struct svc_value *backend = bpf_map_lookup_elem(SHOAL_MAP(services), &key);
    if (!backend)
        return choice;  /* the agent is shrinking this service right now; leave the VIP */
    choice.ip = backend->backend_ip;
    choice.port = backend->backend_port;
    choice.found = 1;
#endif
    return choice;
}

#ifndef SHOAL_DENY_SCAN_BACKENDS
#define SHOAL_DENY_SCAN_BACKENDS 16
#endif

/* A meshed pod connecting to a VIP: the proxy picks the backend later, so the connect
 * fails only when every backend denies (the first SHOAL_DENY_SCAN_BACKENDS of them);
 * otherwise the proxy and the destination enforce per backend. Returns the rule id. */
static __always_inline __u32 service_denied(__u32 src_identity, __u32 vip, __u16 port)
{
    struct svc_key key = { .vip = vip, .port = port, .slot = 0 };
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
        rule = policy_denied(src_identity, identity_of(backend->backend_ip), bpf_ntohs(backend->backend_port),
                             IPPROTO_TCP);
        if (!rule)
            return 0;
    }
    return rule;
}

int shoal_connect4(struct bpf_sock_addr *ctx)
{
    __u64 start = bpf_ktime_get_ns();
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    /* The proxy's own sockets carry the mark: never capture them (no loops). */
    if (sk->mark == SHOAL_PROXY_MARK) {
        count(COUNTER_CONNECT_SKIPPED_MARK, 1);
        return 1;
    }

    __u32 dst_ip = ctx->user_ip4;
    __u16 dst_port = (__u16)ctx->user_port;
    if ((bpf_ntohl(dst_ip) & 0xff000000) == LOOPBACK_NET)
        return 1;

    __u64 netns = bpf_get_netns_cookie(ctx);
    struct pod_info *pod = bpf_map_lookup_elem(SHOAL_MAP(enrolled_pods), &netns);
    struct backend_choice backend = pick_backend(dst_ip, dst_port);

    if (pod && ctx->type == SOCK_STREAM_TYPE) {
        __u32 target_ip = backend.found ? backend.ip : dst_ip;
        __u16 target_port = backend.found ? backend.port : dst_port;
        __u32 dst_identity = identity_of(target_ip);
        __u32 rule = backend.found ? service_denied(pod->identity, dst_ip, dst_port)
                                   : policy_denied(pod->identity, dst_identity, bpf_ntohs(target_port), IPPROTO_TCP);
        struct flow_event event = {
            .src_ip = pod->ip, .dst_ip = dst_ip,
            .dst_port = bpf_ntohs(dst_port),
            .src_identity = pod->identity, .dst_identity = dst_identity,
            .protocol = IPPROTO_TCP, .direction = DIRECTION_EGRESS, .kind = KIND_CONNECT,
            .tcp_flags = 0x02,  /* the SYN this connect() is about to send */
        };
        if (rule) {
            event.verdict = VERDICT_DROPPED;
            event.drop_reason = DROP_POLICY_DENY;
            event.rule_id = rule;
            emit_flow(&event);
            count(COUNTER_CONNECT_DENIED, 1);
            return 0;
        }
        __u64 cookie = bpf_get_socket_cookie(ctx);
        struct orig_dst orig = { .ip = dst_ip, .port = dst_port };
        bpf_map_update_elem(SHOAL_MAP(origdst_by_cookie), &cookie, &orig, BPF_ANY);
        ctx->user_ip4 = bpf_htonl(0x7f000001);
        ctx->user_port = bpf_htons(SHOAL_PORT_OUTBOUND);
        event.verdict = VERDICT_REDIRECTED;
        emit_flow(&event);
        count(COUNTER_CONNECT_REDIRECTED, 1);
        observe_cost(COST_CONNECT, COUNTER_CONNECT_NS, COUNTER_CONNECT_RUNS, start);
        return 1;
    }

    if (backend.found) {
        ctx->user_ip4 = backend.ip;
        ctx->user_port = backend.port;
        count(COUNTER_CONNECT_BALANCED, 1);
        observe_cost(COST_CONNECT, COUNTER_CONNECT_NS, COUNTER_CONNECT_RUNS, start);
    }
    return 1;
}
