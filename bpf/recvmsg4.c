/* cgroup/recvmsg4: a reply from a backend reads as coming from the VIP the socket
 * sent to (DNS-style clients compare the source with the server they asked).
 *
 * Attached to the node's root cgroup. All logic is shared with the other family's
 * entry point in lib/sock.h; this file only says which fields of bpf_sock_addr hold
 * the address (user_ip4).
 */
#include "lib/sock.h"

int shoal_recvmsg4(struct bpf_sock_addr *ctx)
{
    return sock_recvmsg(ctx, FAMILY_V4);
}
