/* cgroup/connect6: the AF_INET6 twin of connect4. ::ffff:a.b.c.d takes exactly the
 * IPv4 path (same keys, same verdicts), native IPv6 its own keys in the same maps.
 *
 * Attached to the node's root cgroup. All logic is shared with the other family's
 * entry point in lib/sock.h; this file only says which fields of bpf_sock_addr hold
 * the address (user_ip6).
 */
#include "lib/sock.h"

int shoal_connect6(struct bpf_sock_addr *ctx)
{
    return sock_connect(ctx, FAMILY_V6);
}
