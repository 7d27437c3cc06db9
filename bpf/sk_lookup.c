/* sk_lookup, linked to each meshed pod's network namespace: the stack asks it which
 * listener gets a new TCP connection, and it always names the proxy's.
 *
 * tc already assigns ordinary SYNs (the stack then skips the listener lookup). This
 * program covers the one path tc cannot: a SYN that reuses the 4-tuple of a TIME_WAIT
 * socket. The stack recycles the TIME_WAIT and looks a listener up for the original
 * port (the app's); assigning the listener from tc instead would be refused next to
 * the TIME_WAIT. tc writes the proxy_listeners entry (pod IP, 15006) right before it
 * hands such a SYN over; without an entry this program drops, never picks the app.
 * Connections arriving on lo are left alone: the proxy delivers to the app's pod IP
 * from a socket bound to lo (a connect to a local address reports the address's device,
 * eth0, as its ingress unless the socket itself routed through lo; see
 * agent/ztunnel/transparent.py), and pod-local connects are captured by connect4/6
 * before they get here. Both families: keys are struct shoal_addr.
 */
#include "lib/helpers.h"

#define LOOPBACK_IFINDEX 1

int shoal_sk_lookup(struct bpf_sk_lookup *ctx)
{
    if (ctx->protocol != IPPROTO_TCP)
        return SK_PASS;
    if (ctx->ingress_ifindex == LOOPBACK_IFINDEX)
        return SK_PASS;
    /* Lookups for the proxy's own ports resolve normally: tc's bpf_sk_lookup_tcp() of
     * the listener runs through here too, and must find it before the entry exists. */
    if (ctx->local_port == SHOAL_PORT_INBOUND || ctx->local_port == SHOAL_PORT_HBONE)
        return SK_PASS;
    struct listener_key key = { .port = SHOAL_PORT_INBOUND };
    if (ctx->family == 2 /* AF_INET */) {
        key.ip = addr_from_v4(ctx->local_ip4);
    } else {
        key.ip.w[0] = ctx->local_ip6[0];
        key.ip.w[1] = ctx->local_ip6[1];
        key.ip.w[2] = ctx->local_ip6[2];
        key.ip.w[3] = ctx->local_ip6[3];
    }
    struct bpf_sock *proxy = bpf_map_lookup_elem(SHOAL_MAP(proxy_listeners), &key);
    if (!proxy)
        return SK_DROP;   /* no proxy listener known: fail closed, never the app's */
    long err = bpf_sk_assign(ctx, proxy, 0);
    bpf_sk_release(proxy);
    return err ? SK_DROP : SK_PASS;
}
