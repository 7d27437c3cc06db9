"""Per-node flow observability, Hubble-compatible (issue 7).

Pieces, each usable on its own:

- ``emitter.FlowEmitter(path)``: used by the node proxy and the waypoint to send their
  L4/L7 ``flow_pb2.Flow`` records to the agent over ``ClusterLayout.flows_socket(node)``
  (Unix datagrams, never blocks; drops and counts when the agent is away or slow).
  ``flows.l4_flow(...)`` / ``flows.http_flow(...)`` build those records.
- ``store.FlowStore``: the bounded ring (4,095 by default) with followers.
- ``filters``: Hubble's FlowFilter semantics, pure.
- ``enrich``: kernel events and bare flows -> Hubble flows with endpoints from ConfigState.
- ``server.HubbleServer``: the Observer gRPC API + health, on TCP 4244 and a Unix socket.
- ``shoal.agent.ringbuf.RingReader`` (the agent's) feeds ``kernel_records`` raw records in batches.

How the agent's wiring module builds it::

    from shoal.agent.hubble import HubbleConfig, HubbleServer

    hubble = HubbleServer(
        HubbleConfig.for_node(layout, node),   # or HubbleConfig(node_name=..., ...)
        state,                                  # shoal.xds.state.ConfigState (read only)
        registry=registry,                      # the agent's prometheus CollectorRegistry
        kernel_lost=agent.lost_events,          # () -> int, cumulative ring-buffer losses
    )
    # The fast path: batches of raw FlowRecord bytes, decoded only when read; about 500k
    # records/s without loss here (perf/scenarios/flows.py), against ~100k/s for libbcc's
    # per-record callback with eager decoding.
    reader = RingReader(maps.fds["flow_events"], RINGBUF_BYTES, hubble.kernel_records)
    reader.start()           # its own thread; kernel_records is thread-safe
    await hubble.start()     # binds flows socket, hubble socket and TCP 4244
    ...
    reader.stop(); await hubble.stop()

``hubble.kernel_sink(event)`` takes one decoded ``KernelFlowEvent`` instead (also
thread-safe, about 0.5 us); call it directly from the reader thread, not through
``loop.call_soon_threadsafe`` (a self-pipe write per event). Either way the Hubble Flow
is built only when someone reads it.
"""
from shoal.agent.hubble.config import HubbleConfig

__all__ = ["HubbleConfig", "HubbleServer"]


def __getattr__(name: str):
    # The server pulls in grpc; keep ``import shoal.flows.emitter`` light for the proxy.
    if name == "HubbleServer":
        from shoal.agent.hubble.server import HubbleServer

        return HubbleServer
    raise AttributeError(name)
