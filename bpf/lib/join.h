/* The same-node app join, shared by sockops.c (inserting app sockets) and
 * sk_msg_join.c (redirecting their sends): one key form for both families, and the
 * app socket's key.
 */
#pragma once
#include "helpers.h"

#define AF_INET_ 2
#define AF_INET6_ 10

/* The app socket's fields the switch reads (sk_msg_join.c); without them (no kernel BTF)
 * no app socket enters app_socks and no send is redirected. */
#if defined(SHOAL_TCP_SOCK_WRITE_SEQ) && defined(SHOAL_SOCK_SK_SOCKET) && defined(SHOAL_SOCKET_FILE) && \
    defined(SHOAL_FILE_F_FLAGS)
#define SHOAL_APP_JOIN_FIELDS 1
#else
#define SHOAL_APP_JOIN_FIELDS 0
#endif

static __always_inline int app_join_enabled(void)
{
    __u32 slot = CONFIG_APP_JOIN;
    __u64 *on = bpf_map_lookup_elem(SHOAL_MAP(config), &slot);
    return on && *on;
}

/* One u32 of a socket-level context, loaded as one u32: the verifier refuses a wider load
 * of these fields, which clang would otherwise make of two neighbours. */
#define CTX_U32(field) (*(volatile __u32 *)&(field))

/* An app socket's key from a sock_ops or sk_msg context: the v4 field as mapped for
 * AF_INET, the v6 field as is (an AF_INET6 socket's IPv4 peer is ::ffff:a.b.c.d already).
 * Both contexts carry remote_port as the network-order port in the upper 16 bits and
 * local_port in host order (uapi quirk, as sockops.c reads it). */
#define APP_KEY_FILL(key, ctx, netns_cookie) do {                                                 \
    (key).netns = (netns_cookie);                                                                 \
    if (CTX_U32((ctx)->family) == AF_INET_) {                                                     \
        (key).local = addr_from_v4(CTX_U32((ctx)->local_ip4));                                    \
        (key).remote = addr_from_v4(CTX_U32((ctx)->remote_ip4));                                  \
    } else {                                                                                      \
        (key).local.w[0] = CTX_U32((ctx)->local_ip6[0]);                                          \
        (key).local.w[1] = CTX_U32((ctx)->local_ip6[1]);                                          \
        (key).local.w[2] = CTX_U32((ctx)->local_ip6[2]);                                          \
        (key).local.w[3] = CTX_U32((ctx)->local_ip6[3]);                                          \
        (key).remote.w[0] = CTX_U32((ctx)->remote_ip6[0]);                                        \
        (key).remote.w[1] = CTX_U32((ctx)->remote_ip6[1]);                                        \
        (key).remote.w[2] = CTX_U32((ctx)->remote_ip6[2]);                                        \
        (key).remote.w[3] = CTX_U32((ctx)->remote_ip6[3]);                                        \
    }                                                                                             \
    (key).local_port = (__u16)CTX_U32((ctx)->local_port);                                         \
    (key).remote_port = (__u16)bpf_ntohl(CTX_U32((ctx)->remote_port));                            \
} while (0)


#define O_NONBLOCK_ 04000

#if SHOAL_APP_JOIN_FIELDS
/* Whether a socket's file is non-blocking (sock->sk_socket->file->f_flags, at BTF
 * offsets); -1 if it has no file (yet: a socket not accepted). ``tp`` is what
 * bpf_skc_to_tcp_sock returned for it. */
static __always_inline int file_nonblocking(void *tp)
{
    void *sock = *(void **)(tp + SHOAL_SOCK_SK_SOCKET);
    if (!sock)
        return -1;
    void *file = *(void **)(sock + SHOAL_SOCKET_FILE);
    if (!file)
        return -1;
    return (*(__u32 *)(file + SHOAL_FILE_F_FLAGS) & O_NONBLOCK_) != 0;
}
#endif
