"""The agent's own events for Hubble's GetAgentEvents: what the agent applied and when.

Where Cilium reports its policy engine and endpoint lifecycle, Shoal's agent reports what
its config stream changed on this node: it started, an AuthorizationPolicy was updated or
deleted, a pod of this node appeared or went, a Service was upserted or deleted. Kept in
the same lock-free ring as flows (``FlowStore``), so followers and bounds work alike.
"""
from __future__ import annotations

import time
import zlib

from shoal.api.flow import flow_pb2
from shoal.api.observer import observer_pb2
from shoal.flows.store import FlowStore, RingSource
from shoal.xds import model as m

DEFAULT_CAPACITY = 1023


def _policy_labels(namespace: str, name: str) -> list[str]:
    # Cilium's policy-derived labels, which Hubble's printers show.
    return [f"k8s:io.cilium.k8s.policy.name={name}", f"k8s:io.cilium.k8s.policy.namespace={namespace}"]


def _service_id(key: str) -> int:
    return zlib.crc32(key.encode())


class AgentEvents:
    def __init__(self, node_name: str, capacity: int = DEFAULT_CAPACITY) -> None:
        self.node_name = node_name
        self.store = FlowStore(capacity)

    def record(self, event: flow_pb2.AgentEvent, ts_ns: int | None = None) -> None:
        """Stores one event; safe from any thread (deltas arrive on the agent's loop)."""
        self.store.append(ts_ns or time.time_ns(), event)

    def started(self) -> None:
        event = flow_pb2.AgentEvent(type=flow_pb2.AGENT_STARTED)
        event.agent_start.time.FromNanoseconds(time.time_ns())
        self.record(event)

    def on_delta(self, delta: m.ConfigDelta) -> None:
        """``ConfigState.subscribe`` callback: one event per change that concerns this node."""
        revision = int(delta.version) if str(delta.version).isdigit() else 0
        for resource in delta.upserted:
            key = m.resource_key(resource)
            if isinstance(resource, m.Authorization):
                self.record(flow_pb2.AgentEvent(type=flow_pb2.POLICY_UPDATED, policy_update=flow_pb2.PolicyUpdateNotification(
                    labels=_policy_labels(resource.namespace, resource.name), revision=revision,
                    rule_count=len(resource.rules))))
            elif isinstance(resource, m.Workload) and resource.node == self.node_name and key not in delta.previous:
                self.record(self._endpoint(flow_pb2.ENDPOINT_CREATED, resource))
            elif isinstance(resource, m.Service):
                self.record(self._service(key, resource))
        for key in delta.removed:
            kind, _, name = key.partition("/")
            previous = delta.previous.get(key)
            if kind == m.AUTHORIZATION:
                namespace, _, policy = name.partition("/")
                self.record(flow_pb2.AgentEvent(type=flow_pb2.POLICY_DELETED, policy_update=flow_pb2.PolicyUpdateNotification(
                    labels=_policy_labels(namespace, policy), revision=revision)))
            elif kind == m.WORKLOAD and isinstance(previous, m.Workload) and previous.node == self.node_name:
                self.record(self._endpoint(flow_pb2.ENDPOINT_DELETED, previous))
            elif kind == m.SERVICE:
                self.record(flow_pb2.AgentEvent(type=flow_pb2.SERVICE_DELETED,
                                                service_delete=flow_pb2.ServiceDeleteNotification(id=_service_id(key))))

    def capture_drift(self, pod: str, kind: str, detail: str, repaired: bool) -> None:
        """The capture audit re-did (or failed to re-do) part of an endpoint's datapath: Cilium's
        endpoint regeneration, with what was missing as the error text."""
        namespace, _, name = pod.partition("/")
        self.record(flow_pb2.AgentEvent(
            type=flow_pb2.ENDPOINT_REGENERATE_SUCCESS if repaired else flow_pb2.ENDPOINT_REGENERATE_FAILURE,
            endpoint_update=flow_pb2.EndpointUpdateNotification(
                pod_name=name, namespace=namespace, error=f"capture drift: {kind}: {detail}")))

    @staticmethod
    def _endpoint(kind: int, workload: m.Workload) -> flow_pb2.AgentEvent:
        labels = [f"k8s:{label}={value}" for label, value in sorted(workload.labels.items())]
        return flow_pb2.AgentEvent(type=kind, endpoint_update=flow_pb2.EndpointUpdateNotification(
            id=workload.identity, labels=labels, pod_name=workload.name, namespace=workload.namespace))

    @staticmethod
    def _service(key: str, service: m.Service) -> flow_pb2.AgentEvent:
        notification = flow_pb2.ServiceUpsertNotification(id=_service_id(key), name=service.name,
                                                          namespace=service.namespace, type="ClusterIP")
        port = service.ports[0].port if service.ports else 0
        notification.frontend_address.ip, notification.frontend_address.port = service.vip, port
        return flow_pb2.AgentEvent(type=flow_pb2.SERVICE_UPSERTED, service_upsert=notification)

    def source(self) -> RingSource:
        return RingSource(self.store, self.respond, None, "agent events")

    def respond(self, seq: int, entry, query) -> observer_pb2.GetAgentEventsResponse | None:
        ts_ns, event = entry
        if not query.in_time(ts_ns):
            return None
        response = observer_pb2.GetAgentEventsResponse(agent_event=event, node_name=self.node_name)
        response.time.FromNanoseconds(ts_ns)
        return response
