/* sk_msg verdict on the app_socks SOCKHASH: the same-node app join.
 *
 * A joined pair (sk_skb_bypass.c) carries every byte over two loopback TCP connections
 * and the psock's workqueue: app C -> proxy socket P_in ~verdict~ P_out -> app S. This
 * program runs in the apps' own sendmsg() (C's and S's sockets, which sockops.c put in
 * app_socks) and, once the proxy linked them to the pair (app_links), sends their bytes
 * straight into the proxy's socket toward the other app (C's sends into P_out, S's into
 * P_in): one copy, in the sender's own call, no workqueue.
 *
 * Into the proxy socket's *egress* (flags 0), not the other app's ingress: the send is
 * bounded by that socket's send buffer like any TCP send (bpf_tcp_ingress would not bound
 * it), and the bytes and the FIN still pass the proxy's socket, so the proxy keeps its
 * view of them (byte counts from its socket's queue, FIN and RST as before).
 *
 * The switch. A redirected send must never overtake bytes of its direction still on their
 * way through the proxy's path (sent before the pair was linked). sk_msg can only redirect
 * or pass a send, not hold it, and it cannot look at the proxy's sockets (a SOCKHASH lookup
 * takes a reference that an sk_msg program may not release), so it relies on facts the
 * verdict and the proxy publish. A direction is switched on at the first send for which:
 *  - every byte the app ever queued on its own socket (write_seq since sockops saw it
 *    established, app_origin) has met the verdict on the proxy's source socket (counted
 *    there, redirected or handed back); we hold the app socket's lock, so no new byte can
 *    start that way;
 *  - the verdict failed on none, and the proxy relayed every byte handed back to it;
 *  - the proxy saw every byte the verdict redirected queued on the target (app_links.landed,
 *    which it publishes once drained: after a join, after each relay, every 2 s).
 * Otherwise the send passes: today's path. Once switched, the verdict on the source hands
 * every byte it still sees of the direction to the proxy (sk_skb_bypass.c): a send of
 * another thread racing the switch reaches the target after the bytes already there, as
 * interleaved sends of two threads may on any socket.
 *
 * Blocking sockets only. A redirected send into a full target makes a non-blocking app's
 * send fail with EAGAIN while its own (empty) socket polls writable, and nothing would wake
 * an edge-triggered app; and the program cannot see the target's room. So only an app
 * socket without O_NONBLOCK is switched (its send waits on the target like on its own
 * socket); one that becomes non-blocking retires the direction: its sends take the proxy's
 * path for good, which never reorders (a redirect is complete when the app's send
 * returns). A blocking socket sent to with MSG_DONTWAIT is not seen here (the flags are not
 * in the context): such a send into a full target returns EAGAIN.
 *
 * Security: the redirect's key is the link the proxy wrote for this very socket, found by
 * the socket's own addresses and netns, never by anything in the payload; only sockets of
 * a pair the proxy checked are linked; no byte leaves the node (both targets are the
 * proxy's own sockets on pod loopbacks of this node).
 */
#include "lib/join.h"

#if SHOAL_APP_JOIN_FIELDS
/* The app socket's write_seq, and whether its file is blocking. */
static __always_inline int app_socket(struct sk_msg_md *msg, __u32 *write_seq, int *blocking)
{
    struct bpf_sock *app = msg->sk;
    if (!app)
        return 0;
    void *tp = bpf_skc_to_tcp_sock(app);
    if (!tp)
        return 0;
    *write_seq = *(volatile __u32 *)(tp + SHOAL_TCP_SOCK_WRITE_SEQ);
    *blocking = file_nonblocking(tp) == 0;
    return 1;
}

/* Nothing of this direction is anywhere but on the target (see the header). */
static __always_inline int proxy_path_empty(struct app_key *key, struct app_link *link, __u32 app_written)
{
    __u64 *origin = bpf_map_lookup_elem(SHOAL_MAP(app_origin), key);
    if (!origin)
        return 0;
    struct bypass_pair *pair = bpf_map_lookup_elem(SHOAL_MAP(bypass_pairs), &link->source);
    if (!pair || pair->unredirected)
        return 0;
    if ((__u32)(pair->bytes + pair->handed_back) != app_written - (__u32)*origin)
        return 0;
    __u64 *relayed = bpf_map_lookup_elem(SHOAL_MAP(bypass_relayed), &link->source);
    if (!relayed || *relayed != pair->handed_back)
        return 0;
    return link->landed == pair->bytes;
}
#endif

int shoal_sk_msg_join(struct sk_msg_md *msg)
{
#if SHOAL_APP_JOIN_FIELDS
    struct app_key key = {};
    APP_KEY_FILL(key, msg, bpf_get_netns_cookie(msg));
    struct app_link *found = bpf_map_lookup_elem(SHOAL_MAP(app_links), &key);
    if (!found)
        return SK_PASS;   /* not linked (yet, or any more): the proxy's path */
    struct app_link link = *found;
    /* Under the app socket's lock: the one writer of this entry. */
    struct app_direct *direct = bpf_map_lookup_elem(SHOAL_MAP(app_direct), &link.source);
    if (!direct || direct->state == DIRECT_RETIRED)
        return SK_PASS;
    __u32 app_written = 0;
    int blocking = 0;
    if (!app_socket(msg, &app_written, &blocking) || !blocking) {
        if (direct->state == DIRECT_ON)
            direct->state = DIRECT_RETIRED;
        return SK_PASS;
    }
    if (direct->state == DIRECT_OFF && !proxy_path_empty(&key, &link, app_written)) {
        direct->waits += 1;
        return SK_PASS;
    }
    if (bpf_msg_redirect_hash(msg, SHOAL_MAP(bypass_socks), &link.target, 0) != SK_PASS) {
        /* The target left the map (closing): the proxy's path, where the proxy ends the pair. */
        if (direct->state == DIRECT_ON)
            direct->state = DIRECT_RETIRED;
        return SK_PASS;
    }
    direct->state = DIRECT_ON;
    direct->sends += 1;
    direct->bytes += msg->size;
#endif
    return SK_PASS;
}
