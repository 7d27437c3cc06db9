"""The flow contract shared by every process that makes, moves or reads flows.

- ``records``: builders of the Hubble flows the node proxy (L4) and the waypoint (L7) emit.
- ``emitter``: ``FlowEmitter``, the datagram sender to the agent (never blocks).
- ``kernel``: ring-buffer records decoded into ``KernelFlowEvent``.
- ``store``: the bounded flow ring with followers; ``filters``, ``query``: Hubble's
  FlowFilter semantics and GetFlows requests, pure.
- ``writer``: ``GuardedWriter``, bounded streaming writes for the agent and the relay.
"""
