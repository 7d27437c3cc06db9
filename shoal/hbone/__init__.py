"""HBONE: TCP tunnelled in HTTP/2 CONNECT over mutual TLS 1.3, shared by the node proxy and the waypoint.

- ``framing``: the pure protocol layer (``HboneConnection``; no I/O).
- ``session``: the asyncio drivers (``HboneSession``, ``StreamPeer``, ``PipeEnd``).
- ``pool``: outbound connections pooled per (source, destination identity, address).
- ``identity``: SVIDs, their TLS contexts and SPIFFE checks (``IdentityManager``).
- ``stream``: ``HboneStream``, one stream as an async byte stream (the waypoint parses HTTP in it).
- ``fastpath``: a pure DATA/WINDOW_UPDATE framer for established tunnels (not wired in yet).
"""
