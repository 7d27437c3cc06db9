/* cgroup/sendmsg6: sendmsg4 for AF_INET6 sockets, mapped or native destinations.
 *
 * Attached to the node's root cgroup. All logic is shared with the other family's
 * entry point in lib/sock.h; this file only says which fields of bpf_sock_addr hold
 * the address (user_ip6).
 */
#include "lib/sock.h"

int shoal_sendmsg6(struct bpf_sock_addr *ctx)
{
    return sock_sendmsg(ctx, FAMILY_V6);
}
