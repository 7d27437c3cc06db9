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

int shoal_sockops(struct bpf_sock_ops *skops)
{
    if (skops->family != AF_INET_ && skops->family != AF_INET6_)
        return 1;
    __u32 op = skops->op;
    if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
        /* remote_port is the network-order port in the upper 16 bits (uapi quirk). */
        if (bpf_ntohl(skops->remote_port) != SHOAL_PORT_OUTBOUND)
            return 1;
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
