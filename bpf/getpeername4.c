/* cgroup/getpeername4 on the node's root cgroup: a captured app asks who it talks to.
 *
 * Its socket is really connected to the proxy's 127.0.0.1:15001; without this program
 * getpeername() would say so and break apps that log or check their peer. The
 * original destination stays keyed by socket cookie for the connection's lifetime
 * (sockops deletes it on close), so the answer is one lookup.
 */
#include "lib/helpers.h"

int shoal_getpeername4(struct bpf_sock_addr *ctx)
{
    if (ctx->user_ip4 != bpf_htonl(0x7f000001) || ctx->user_port != bpf_htons(SHOAL_PORT_OUTBOUND))
        return 1;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct orig_dst *orig = bpf_map_lookup_elem(SHOAL_MAP(origdst_by_cookie), &cookie);
    if (!orig)
        return 1;
    ctx->user_ip4 = orig->ip;
    ctx->user_port = orig->port;
    return 1;
}
