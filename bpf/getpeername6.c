/* cgroup/getpeername6: getpeername4 for AF_INET6 sockets (::ffff:127.0.0.1 or ::1 ->
 * the original destination).
 *
 * Attached to the node's root cgroup. All logic is shared with the other family's
 * entry point in lib/sock.h; this file only says which fields of bpf_sock_addr hold
 * the address (user_ip6).
 */
#include "lib/sock.h"

int shoal_getpeername6(struct bpf_sock_addr *ctx)
{
    return sock_getpeername(ctx, FAMILY_V6);
}
