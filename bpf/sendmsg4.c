/* cgroup/sendmsg4: unconnected UDP (sendto) to a VIP goes to a backend; a meshed
 * sender's datagram to a denied destination fails with EPERM.
 *
 * Attached to the node's root cgroup. All logic is shared with the other family's
 * entry point in lib/sock.h; this file only says which fields of bpf_sock_addr hold
 * the address (user_ip4).
 */
#include "lib/sock.h"

int shoal_sendmsg4(struct bpf_sock_addr *ctx)
{
    return sock_sendmsg(ctx, FAMILY_V4);
}
