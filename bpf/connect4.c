/* cgroup/connect4: service socket-LB for every pod (TCP and UDP), outbound capture
 * and connect-time L4 DENY for meshed pods. Runs once per connect(), not per packet.
 *
 * Attached to the node's root cgroup. All logic is shared with the other family's
 * entry point in lib/sock.h; this file only says which fields of bpf_sock_addr hold
 * the address (user_ip4).
 */
#include "lib/sock.h"

int shoal_connect4(struct bpf_sock_addr *ctx)
{
    return sock_connect(ctx, FAMILY_V4);
}
