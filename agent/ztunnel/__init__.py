"""The node proxy (ztunnel-style): in-pod listeners, HBONE mTLS, L4 authorization, TCP telemetry.

Run as ``python -m shoal.agent.ztunnel --node node-1``. Modules: ``zds`` (pod handover
from the agent), ``hbone`` (pure HTTP/2 CONNECT layer), ``identity`` (SVIDs), ``authz``
(L4 AuthorizationPolicy), ``inbound``/``outbound`` (the listeners), ``app`` (wiring).
"""
