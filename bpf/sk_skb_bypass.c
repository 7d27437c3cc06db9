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
 * byte it reads there as the end of the pair and resets both sides. Nothing is
 * dropped silently and nothing goes anywhere but to the intended peer or the proxy.
 */
#include "lib/helpers.h"

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
    __u64 peer = pair->peer;
    if (bpf_sk_redirect_hash(skb, SHOAL_MAP(bypass_socks), &peer, 0) != SK_PASS) {
        __sync_fetch_and_add(&pair->unredirected, 1);
        return SK_PASS;
    }
    /* Counted at the verdict: the proxy compares it with what the peer has queued
     * before it forwards a FIN (the redirect itself completes on a workqueue). */
    __sync_fetch_and_add(&pair->bytes, skb->len);
    return SK_PASS;
}
