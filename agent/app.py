"""Wiring: builds the agent from its config and runs it.

    datapath (programs, pinned maps) <- map reconciler <- ConfigState <- ConfigClient
    enroller (cookie map, tc, ZDS link to the node proxy) <- ConfigState
    capture audit (every enrolled pod still captured? repair, report) -> metrics, flows, status file
    ring buffer reader -> Hubble server (flows), metrics

Stopping the agent (SIGTERM or SIGKILL) leaves programs, pins, tc filters and maps in
place: the kernel keeps capturing, and the next agent adopts them. Only
`shoal.agent.uninstall.remove_node` takes them away.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from shoal.agent import compiler
from shoal.agent.audit import CaptureAudit, Drift
from shoal.agent.config import AgentConfig
from shoal.agent.enrolment import Enroller, LocalPodNetns, PodPrograms
from shoal.agent.loader import Datapath
from shoal.agent.mapsync import DatapathMaps
from shoal.agent.metrics import AgentMetrics
from shoal.agent.ringbuf import RingReader
from shoal.agent.zdslink import ZdsProxyLink
from shoal.config import ClusterLayout
from shoal.datapath.structs import RINGBUF_BYTES
from shoal.flows.records import capture_drift_flow
from shoal.xds import model as m
from shoal.xds.client import ConfigClient
from shoal.xds.state import ConfigState

log = logging.getLogger("shoal.agent")


class MapReconciler:
    """Keeps ipcache, services and policy_deny equal to what ConfigState implies."""

    def __init__(self, node: str, state: ConfigState, maps: DatapathMaps, metrics: AgentMetrics | None = None):
        self.node = node
        self.state = state
        self.maps = maps
        self.metrics = metrics
        self.last_sync_seconds = 0.0
        self.skipped: list[compiler.Skipped] = []

    def sync(self, delta: m.ConfigDelta | None = None) -> None:
        started = time.perf_counter()
        workloads = self.state.all_workloads()
        changed_types = None if delta is None else {type(r) for r in delta.upserted} | {
            k.split("/", 1)[0] for k in delta.removed}
        if changed_types is None or changed_types & {m.Workload, m.WORKLOAD}:
            self.maps.sync_endpoints(compiler.endpoints(workloads, self.node))
        if changed_types is None or changed_types & {m.Workload, m.WORKLOAD, m.Service, m.SERVICE}:
            by_uid = {w.uid: w for w in workloads}
            self.maps.sync_services(compiler.services(self.state.all_services(), by_uid))
        if changed_types is None or changed_types & {m.Workload, m.WORKLOAD, m.Authorization, m.AUTHORIZATION}:
            entries, self.skipped = compiler.deny_entries(self.state.all_policies(), workloads)
            self.maps.sync_policies(entries)
            for skipped in self.skipped:
                log.debug("DENY %s not compiled into the kernel: %s", skipped.policy, skipped.reason)
        self.last_sync_seconds = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.map_sync_seconds.observe(self.last_sync_seconds)
            self.metrics.policies_skipped.set(len(self.skipped))


class AgentApp:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.registry = CollectorRegistry()
        self.state = ConfigState()
        self.datapath = Datapath(config.pin_dir, config.features, config.bpf_source_dir)
        self.maps: DatapathMaps | None = None
        self.metrics: AgentMetrics | None = None
        self._stop = asyncio.Event()
        self._reconcile = asyncio.Event()

    def _validate(self, resource: m.Resource) -> None:
        try:
            compiler.validate(resource)
        except ValueError as err:
            log.warning("rejecting %s from the config stream: %s", m.resource_key(resource), err)
            if self.metrics is not None:
                self.metrics.config_rejected.labels(m.resource_type(resource)).inc()
            raise

    def _netns_resolver(self):
        """Local cluster: namespaces have names; Kubernetes: found through the host's /proc."""
        from shoal.agent.k8s import KubernetesPodNetns
        from shoal.kubernetes import KubernetesLayout
        layout = self.config.layout
        if isinstance(layout, KubernetesLayout) and layout.netns_dir is not None:
            # A local cluster's node run from the DaemonSet: its pods' namespaces are named.
            return LocalPodNetns(ClusterLayout(name=layout.name), layout.netns_dir)
        if isinstance(layout, KubernetesLayout):
            return KubernetesPodNetns(layout.proc_root)
        return LocalPodNetns(self.config.layout)

    def lost_events(self) -> int:
        kernel = self.maps.counters().get("ringbuf_lost", 0) if self.maps else 0
        # Records the reader discarded (busy or short) are lost to Hubble as well.
        return kernel + (self.reader.discarded if getattr(self, "reader", None) else 0)

    def _proxy_cgroup(self, cgroup_id: int) -> None:
        """The node proxy's sockets are exempt from capture by its cgroup (see cgroupid.py)."""
        if cgroup_id != self.maps.proxy_cgroup():
            log.info("node proxy runs in cgroup %d: its sockets are exempt from capture", cgroup_id)
        self.maps.set_proxy_cgroup(cgroup_id)

    async def run(self) -> None:
        config = self.config
        # Load everything first: a program that fails to verify stops us here, attaching nothing.
        self.datapath.load()
        self.datapath.pin_programs()
        self.datapath.attach_bypass()
        self.datapath.attach_cgroup(config.node_cgroup)
        adopted, replaced = self.datapath.maps.adopted, self.datapath.maps.replaced
        log.info("programs loaded and attached to %s; maps %s%s", config.node_cgroup,
                 f"adopted ({', '.join(adopted)})" if adopted else "created",
                 f"; replaced after a layout change ({', '.join(replaced)})" if replaced else "")
        self.maps = DatapathMaps(config.pin_dir)
        self.metrics = AgentMetrics(self.registry, self.maps.counters, self.maps.cost_histograms)
        reconciler = MapReconciler(config.node, self.state, self.maps, self.metrics)
        proxy = ZdsProxyLink(config.zds_socket, on_proxy_cgroup=self._proxy_cgroup)
        programs = PodPrograms(self.datapath.tc_program_fd(), self.datapath.sk_lookup_program_fd(),
                               config.pin_dir / "links")
        enroller = Enroller(config.node, self.maps, programs, self._netns_resolver(), config.enrolment_state, proxy)
        if enroller.enrolled:
            log.info("adopting %d enrolled pods from %s", len(enroller.enrolled), config.enrolment_state)
        # Re-attach tc and sk_lookup with this agent's programs (atomic replace), so every pod runs the same code.
        for pod in enroller.enrolled.values():
            try:
                await asyncio.to_thread(programs.attach, pod.netns_path, pod.cookie)
            except (OSError, RuntimeError) as err:
                log.warning("re-attach for %s/%s: %s (reconciled later)", pod.namespace, pod.name, err)

        def on_delta(delta: m.ConfigDelta) -> None:
            try:
                reconciler.sync(delta)
            except OSError as err:   # BpfError (a full map...): keep the last good state, retry on next push
                log.error("kernel maps not updated for push %s: %s", delta.version, err)
                self.metrics.config_rejected.labels("map_write").inc()
            self._reconcile.set()
        self.state.subscribe(on_delta)

        client = ConfigClient(config.controller, config.node, Path(config.token_file), self.state,
                              component="agent", validator=self._validate, ca_bundle=config.ca_bundle)
        loop = asyncio.get_running_loop()
        hubble = None
        sink = None
        if config.hubble:
            from shoal.agent.hubble import HubbleConfig, HubbleServer
            hubble = HubbleServer(HubbleConfig.for_node(config.layout, config.node), self.state,
                                  registry=self.registry, kernel_lost=self.lost_events,
                                  cluster_name=config.layout.name)
            sink = hubble.kernel_records
        flow_events = self.metrics.flow_events

        def deliver(records: list[bytes]) -> None:
            # On the reader's thread: raw records in batches, decoded only when a client reads.
            flow_events.inc(len(records))
            if sink is not None:
                sink(records)
        self.reader = RingReader(self.maps.fds["flow_events"], RINGBUF_BYTES, deliver)
        self.reader.start()
        hubble_thread = None
        if hubble is not None:
            # Flow queries run on their own loop: none can delay the policy path (issue 11).
            from shoal.agent.hubble.thread import LoopThread
            hubble_thread = LoopThread("hubble")
            hubble_thread.start()
            await hubble_thread.run(hubble.start())
        runner = await self.metrics.serve(config.metrics_address, config.metrics_port)

        async def on_proxy_synced() -> None:
            self._reconcile.set()

        async def enrolment_loop() -> None:
            await client.synced.wait()   # never reconcile against an empty view (restart adoption)
            while not self._stop.is_set():
                await enroller.reconcile(self.state.all_workloads())
                self.metrics.enrolled_pods.set(len(enroller.enrolled))
                self.metrics.enrol_failures.set(len(enroller.failures))
                self._reconcile.clear()
                try:
                    await asyncio.wait_for(self._reconcile.wait(), config.resync_interval)
                except asyncio.TimeoutError:
                    pass

        def publish_drift(drift: Drift, pod_ips: list[str]) -> None:
            if hubble is None:
                return
            hubble.agent_events.capture_drift(drift.pod, drift.kind, drift.detail, drift.repaired)
            for ip in pod_ips:
                flow = capture_drift_flow(ip, drift.kind, drift.detail, drift.repaired)
                hubble_thread.loop.call_soon_threadsafe(hubble.ingest_flow, flow)

        audit = CaptureAudit(enroller, self.datapath, config.node_cgroup,
                             config.layout.capture_audit_state(config.node), config.audit_interval,
                             self.metrics, on_drift=publish_drift, on_reenrol=self._reconcile.set)

        async def audit_loop() -> None:
            await client.synced.wait()   # adopted pods are re-attached above; audit once the view is whole
            await audit.run()

        tasks = [asyncio.create_task(client.run(), name="config-client"),
                 asyncio.create_task(proxy.run(enroller.replay, on_proxy_synced), name="zds-link"),
                 asyncio.create_task(enrolment_loop(), name="enrolment"),
                 asyncio.create_task(audit_loop(), name="capture-audit")]
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        log.info("agent for %s running (metrics on %s:%d)", config.node, config.metrics_address, config.metrics_port)
        stopper = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopper and task.exception() is not None:
                log.error("%s failed: %r", task.get_name(), task.exception())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
        if hubble is not None:
            await hubble_thread.run(hubble.stop())
            hubble_thread.stop()
        await runner.cleanup()
        self.reader.stop()
        self.maps.close()
        self.datapath.close()
        log.info("agent stopped; programs and pins stay for the next agent")
