/* sockops on the node's root cgroup: re-key a captured connection's original
 * destination by the app socket's 4-tuple, which is what the proxy sees as its peer.
 *
 * ACTIVE_ESTABLISHED runs on the app's socket while the SYN-ACK is processed, before
 * the final ACK leaves, so the entry exists before the proxy can accept() the
 * connection. Both entries (by tuple for the proxy, by cookie for getpeername) are
 * deleted when the app socket closes (STATE_CB). Both families: an AF_INET6 app socket
 * captured to ::ffff:127.0.0.1 or ::1 is keyed like an AF_INET one (see tuple_key).
 *
 * The same-node app join (sk_msg_join.c, only while the proxy turned it on: config
 * CONFIG_APP_JOIN): the apps' sockets of a same-node connection enter app_socks here,
 * the only place that can insert them (the proxy holds no descriptor of them;
 * bpf_sock_hash_update is allowed at ACTIVE/PASSIVE_ESTABLISHED): the client app's
 * captured socket when its original destination is a meshed pod of this node and it
 * connected blocking (so no other socket pays for the sk_msg program), the server app's
 * accepted socket when the
 * proxy announced the connection in app_expected before dialling it. Being in the map
 * redirects nothing: only the proxy's link of a checked pair does.
 */
#include "lib/join.h"

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

/* An app socket into app_socks, with its first sequence number (established: nothing
 * sent yet; the SYN's number is behind it), from which the sk_msg program counts what the
 * app queued on its own socket. The origin first: the socket sends nothing before this
 * callback returns. */
static __always_inline void app_enter(struct bpf_sock_ops *skops, struct app_key *key)
{
    __u64 origin = CTX_U32(skops->snd_nxt);
    bpf_map_update_elem(SHOAL_MAP(app_origin), key, &origin, BPF_ANY);
    if (bpf_sock_hash_update(skops, SHOAL_MAP(app_socks), key, BPF_ANY) != 0)
        bpf_map_delete_elem(SHOAL_MAP(app_origin), key);
}

/* The client app's captured socket, toward a meshed pod of this node: into app_socks. */
static __always_inline void client_app_established(struct bpf_sock_ops *skops, const struct shoal_addr *dst)
{
    if (!SHOAL_APP_JOIN_FIELDS || !app_join_enabled())
        return;
    struct endpoint_info *endpoint = endpoint_of(dst);
    __u32 local_meshed = ENDPOINT_LOCAL | ENDPOINT_MESHED;
    if (!endpoint || (endpoint->flags & local_meshed) != local_meshed)
        return;
#if SHOAL_APP_JOIN_FIELDS
    /* A socket that connects non-blocking (Go, Node, nginx, Java NIO...) would never be
     * switched (sk_msg_join.c) and would only pay for the sk_msg send path: left out. */
    struct bpf_sock *sk = skops->sk;
    if (!sk)
        return;
    void *tp = bpf_skc_to_tcp_sock(sk);
    if (!tp || file_nonblocking(tp) != 0)
        return;
#endif
    struct app_key key = {};
    APP_KEY_FILL(key, skops, bpf_get_netns_cookie(skops));
    app_enter(skops, &key);
}

/* A server app's accepted socket the proxy announced (its own connection to the app of
 * a same-node pair): into app_socks. */
static __always_inline void server_app_established(struct bpf_sock_ops *skops)
{
    if (!SHOAL_APP_JOIN_FIELDS || !app_join_enabled())
        return;
    struct app_key key = {};
    APP_KEY_FILL(key, skops, bpf_get_netns_cookie(skops));
    struct app_expect_key expected = { .local = key.local, .remote = key.remote, .local_port = key.local_port };
    if (!bpf_map_lookup_elem(SHOAL_MAP(app_expected), &expected))
        return;
    app_enter(skops, &key);
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
        client_app_established(skops, &copy.ip);
        observe_cost(COST_SOCKOPS, COUNTER_SOCKOPS_NS, COUNTER_SOCKOPS_RUNS, start);
    } else if (op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
        server_app_established(skops);
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
