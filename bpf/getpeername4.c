/* cgroup/getpeername4: a captured app sees the destination it connected to (not the
 * proxy's 127.0.0.1:15001), a connected UDP socket the VIP (not the backend).
 *
 * Attached to the node's root cgroup. All logic is shared with the other family's
 * entry point in lib/sock.h; this file only says which fields of bpf_sock_addr hold
 * the address (user_ip4).
 */
#include "lib/sock.h"

int shoal_getpeername4(struct bpf_sock_addr *ctx)
{
    return sock_getpeername(ctx, FAMILY_V4);
}
