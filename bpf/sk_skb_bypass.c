/* sk_skb stream verdict on the bypass_socks SOCKHASH (attached to the map, not to a
 * cgroup): the same-node bypass of the node proxy.
 *
 * Only the proxy puts sockets into bypass_socks, and only its own two sockets of one
 * connection whose both ends are pods of this node, after it checked both identities
 * and the destination's L4 policy (agent/ztunnel/bypass.py): the accepted socket of
 * the client app's captured connection (client pod's namespace) and its connection to
 * the server app (server pod's namespace). Every skb received on one of them is sent
 * out of the other, so the bytes never climb into the proxy's userspace and never
 * leave the node: both sockets live on loopback devices of pods on this node.
 *
 * The peer is looked up by the receiving socket's own cookie, never by anything in
 * the packet, so no third socket can get its bytes into a pair. An skb that cannot be
 * redirected (the peer already left the map: it is closing) is passed to the
 * receiving socket itself, where only the proxy can read it; the proxy treats any
 * byte it reads there, beyond those handed back (below), as the end of the pair and
 * resets both sides. Nothing is dropped silently and nothing goes anywhere but to the
 * intended peer or the proxy.
 *
 * Backpressure. A redirected skb leaves this socket's receive queue at once (uncharged:
 * TCP reopens the window) and waits in the peer's psock queue, which the kernel does not
 * bound, until the peer's socket has room. So the verdict bounds it: bytes redirected
 * and not yet on the peer's socket (its write_seq since the first byte, minus what the
 * proxy wrote there itself) stay below SHOAL_BYPASS_HIGH_WATER. Past the mark the skb,
 * and every later one, is handed back: passed to this socket, where it is charged to its
 * receive buffer, so TCP closes the sender's window as for any slow reader. The proxy
 * reads the handed-back bytes, writes them to the peer once everything redirected before
 * is on it (no reordering), and records how many it wrote in bypass_relayed; when that
 * equals everything handed back, nothing of this direction is anywhere but on the peer's
 * socket, and the next skb is redirected again.
 */
#include "lib/helpers.h"

/* The peer socket's write_seq (bytes ever queued on it, mod 2^32), read through its
 * tcp_sock with the running kernel's offset (the loader takes it from BTF). 0 if the
 * peer is not in the map (closing: the redirect fails too) or not TCP. */
static __always_inline int peer_write_seq(__u64 peer, __u32 *seq)
{
#ifdef SHOAL_TCP_SOCK_WRITE_SEQ
    struct bpf_sock *sk = bpf_map_lookup_elem(SHOAL_MAP(bypass_socks), &peer);
    if (!sk)
        return 0;
    void *tp = bpf_skc_to_tcp_sock(sk);
    int found = 0;
    if (tp) {
        *seq = *(__u32 *)(tp + SHOAL_TCP_SOCK_WRITE_SEQ);
        found = 1;
    }
    bpf_sk_release(sk);
    return found;
#else
    return 0;   /* no kernel BTF: nothing bounds the peer's queue, so every byte is handed back */
#endif
}

/* This socket's receive buffer size (bytes), or -1 if unknown. */
static __always_inline int own_rcvbuf(__u64 cookie)
{
#if defined(SHOAL_TCP_SOCK_WRITE_SEQ) && defined(SHOAL_SOCK_RCVBUF)
    struct bpf_sock *sk = bpf_map_lookup_elem(SHOAL_MAP(bypass_socks), &cookie);
    if (!sk)
        return -1;
    void *tp = bpf_skc_to_tcp_sock(sk);
    int rcvbuf = tp ? *(int *)(tp + SHOAL_SOCK_RCVBUF) : -1;
    bpf_sk_release(sk);
    return rcvbuf;
#else
    return -1;
#endif
}

/* Handed-back bytes are charged to this socket's receive buffer once they reach its
 * message queue, but while bytes redirected toward this socket wait in its psock queue
 * (its own app not reading), a passed skb waits behind them uncharged, and TCP keeps the
 * window open. So what the proxy has not relayed yet is bounded too: past the receive
 * buffer plus a slack (16 MiB: more than flow control lets through when they are charged),
 * the skb is dropped and counted as unredirected: the proxy resets the pair (fail closed:
 * the sender was pushing past every window). */
static __always_inline int hand_back(struct bypass_pair *pair, struct __sk_buff *skb, __u64 cookie)
{
    __u64 *relayed = bpf_map_lookup_elem(SHOAL_MAP(bypass_relayed), &cookie);
    __u64 unrelayed = pair->handed_back - (relayed ? *relayed : 0);
    int rcvbuf = own_rcvbuf(cookie);
    if (rcvbuf >= 0 && unrelayed + skb->len > (__u64)rcvbuf + SHOAL_BYPASS_UNRELAYED_SLACK) {
        __sync_fetch_and_add(&pair->unredirected, 1);
        return SK_DROP;
    }
    if (pair->state != BYPASS_HANDING_BACK)
        __sync_fetch_and_add(&pair->handbacks, 1);
    pair->state = BYPASS_HANDING_BACK;
    __sync_fetch_and_add(&pair->handed_back, skb->len);
    return SK_PASS;
}

int shoal_sk_skb_bypass(struct __sk_buff *skb)
{
    /* An empty skb is a bare FIN, and it carries nothing TCP still needs: the FIN was
     * handled when it arrived (RCV_SHUTDOWN, the proxy's read returns EOF and it forwards
     * the half-close itself once the bytes before it are out). It must not enter the
     * psock's queue: neither redirected (a zero-byte send) nor passed (behind bytes
     * redirected toward this socket and not sent yet, a passed skb waits in the same
     * queue), since the psock backlog takes a zero-byte skb for a broken pipe: EPIPE on
     * this socket, and every byte queued or redirected to it afterwards is dropped. So
     * it is dropped here, which frees it and nothing else. */
    if (skb->len == 0)
        return SK_DROP;
    __u64 cookie = bpf_get_socket_cookie(skb);
    struct bypass_pair *pair = bpf_map_lookup_elem(SHOAL_MAP(bypass_pairs), &cookie);
    if (!pair)
        return SK_PASS;   /* not paired (yet, or any more): the proxy's own to read */
    /* The apps' sends of this direction switched to the target directly (sk_msg_join.c):
     * a byte still seen here (a send of another thread of the app racing the switch, or
     * every send once the target was full) goes to the proxy, which writes it after
     * everything already on the target; the kernel never redirects behind the switch. */
    struct app_direct *direct = bpf_map_lookup_elem(SHOAL_MAP(app_direct), &cookie);
    if (direct && direct->state != DIRECT_OFF)
        return hand_back(pair, skb, cookie);
    /* The verdict of one socket runs under that socket's lock: one writer per entry. */
    if (pair->state == BYPASS_HANDING_BACK) {
        __u64 *relayed = bpf_map_lookup_elem(SHOAL_MAP(bypass_relayed), &cookie);
        if (!relayed || *relayed != pair->handed_back)
            return hand_back(pair, skb, cookie);   /* the proxy still holds some: stay behind them */
        pair->state = BYPASS_REDIRECTING;
    }
    __u64 peer = pair->peer;
    __u32 seq = 0;
    if (!peer_write_seq(peer, &seq)) {
#ifdef SHOAL_TCP_SOCK_WRITE_SEQ
        __sync_fetch_and_add(&pair->unredirected, 1);   /* the peer is gone: the proxy resets */
        return SK_PASS;
#else
        return hand_back(pair, skb, cookie);
#endif
    }
    if (pair->state == BYPASS_UNSTARTED) {
        pair->peer_seq_base = seq;
        pair->state = BYPASS_REDIRECTING;
    }
    /* On the peer since the first byte: what the psock delivered plus what the proxy
     * relayed (all of handed_back, in this state). In u32: true in-flight is far below 4 GiB. */
    __u32 in_flight = (__u32)(pair->bytes + pair->handed_back) - (seq - pair->peer_seq_base);
    if (in_flight + skb->len > SHOAL_BYPASS_HIGH_WATER)
        return hand_back(pair, skb, cookie);
    if (bpf_sk_redirect_hash(skb, SHOAL_MAP(bypass_socks), &peer, 0) != SK_PASS) {
        __sync_fetch_and_add(&pair->unredirected, 1);
        return SK_PASS;
    }
    /* Counted at the verdict: the proxy compares it with what the peer has queued
     * before it forwards a FIN (the redirect itself completes on a workqueue). */
    __sync_fetch_and_add(&pair->bytes, skb->len);
    return SK_PASS;
}
