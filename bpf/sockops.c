/* sockops on the node's root cgroup: re-key a captured connection's original
 * destination by the app socket's 4-tuple, which is what the proxy sees as its peer.
 *
 * ACTIVE_ESTABLISHED runs on the app's socket while the SYN-ACK is processed, before
 * the final ACK leaves, so the entry exists before the proxy can accept() the
 * connection. Both entries (by tuple for the proxy, by cookie for getpeername) are
 * deleted when the app socket closes (STATE_CB). Both families: an AF_INET6 app socket
 * captured to ::ffff:127.0.0.1 or ::1 is keyed like an AF_INET one (see tuple_key).
 */
#include "lib/helpers.h"

#define AF_INET_ 2
#define AF_INET6_ 10

/* The app socket's local address is the proxy's peer: 127.0.0.1 (also as
 * ::ffff:127.0.0.1 from an AF_INET6 socket) or ::1, one key form for all three. */
static __always_inline struct origdst_key tuple_key(struct bpf_sock_ops *skops)
{
    struct origdst_key key = {
        .cookie = bpf_get_netns_cookie(skops),
        .port = (__u16)skops->local_port,
    };
    if (skops->family == AF_INET_) {
        key.ip = addr_from_v4(skops->local_ip4);
    } else {
        key.ip.w[0] = skops->local_ip6[0];
        key.ip.w[1] = skops->local_ip6[1];
        key.ip.w[2] = skops->local_ip6[2];
        key.ip.w[3] = skops->local_ip6[3];
    }
    return key;
}

/* A connection of a pod outside the mesh: nothing captures it, but the kernel sees it, so
 * Hubble shows it (as Cilium shows every pod): one event when it is established, with the
 * ipcache's identities and no mTLS. Meshed pods' sockets (app and proxy, all in an
 * enrolled netns) are skipped: their connect() and the proxy already report them; so is
 * anything whose local address is no pod's (the node's own daemons). */
static __always_inline void unmeshed_established(struct bpf_sock_ops *skops, __u16 remote_port)
{
    struct origdst_key local = tuple_key(skops);
    if (bpf_map_lookup_elem(SHOAL_MAP(enrolled_pods), &local.cookie))
        return;
    struct endpoint_info *source = endpoint_of(&local.ip);
    if (!source)
        return;
    struct flow_event event = {
        .src_ip = local.ip, .src_port = local.port, .dst_port = remote_port,
        .src_identity = source->identity, .protocol = IPPROTO_TCP, .verdict = VERDICT_FORWARDED,
        .direction = DIRECTION_EGRESS, .kind = KIND_SOCK, .tcp_flags = 0x02,  /* its SYN */
    };
    if (skops->family == AF_INET_) {
        event.dst_ip = addr_from_v4(skops->remote_ip4);
    } else {
        event.dst_ip.w[0] = skops->remote_ip6[0];
        event.dst_ip.w[1] = skops->remote_ip6[1];
        event.dst_ip.w[2] = skops->remote_ip6[2];
        event.dst_ip.w[3] = skops->remote_ip6[3];
    }
    event.dst_identity = identity_of(&event.dst_ip);
    emit_flow(&event);
}

int shoal_sockops(struct bpf_sock_ops *skops)
{
    if (skops->family != AF_INET_ && skops->family != AF_INET6_)
        return 1;
    __u32 op = skops->op;
    if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
        /* remote_port is the network-order port in the upper 16 bits (uapi quirk). */
        __u16 remote_port = (__u16)bpf_ntohl(skops->remote_port);
        if (remote_port != SHOAL_PORT_OUTBOUND) {
            unmeshed_established(skops, remote_port);
            return 1;
        }
        __u64 start = bpf_ktime_get_ns();
        __u64 cookie = bpf_get_socket_cookie(skops);
        struct orig_dst *orig = bpf_map_lookup_elem(SHOAL_MAP(origdst_by_cookie), &cookie);
        if (!orig)
            return 1;
        struct orig_dst copy = *orig;
        struct origdst_key key = tuple_key(skops);
        bpf_map_update_elem(SHOAL_MAP(origdst), &key, &copy, BPF_ANY);
        bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
        count(COUNTER_ORIGDST_RECORDED, 1);
        observe_cost(COST_SOCKOPS, COUNTER_SOCKOPS_NS, COUNTER_SOCKOPS_RUNS, start);
    } else if (op == BPF_SOCK_OPS_STATE_CB) {
        if (skops->args[1] == BPF_TCP_CLOSE) {
            struct origdst_key key = tuple_key(skops);
            __u64 cookie = bpf_get_socket_cookie(skops);
            bpf_map_delete_elem(SHOAL_MAP(origdst), &key);
            bpf_map_delete_elem(SHOAL_MAP(origdst_by_cookie), &cookie);
        }
    }
    return 1;
}
