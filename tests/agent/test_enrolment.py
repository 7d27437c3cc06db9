"""Enrolment driven by ConfigState, against the real programs and a real ZDS server
standing in for the node proxy (it opens in-pod listeners like the proxy does)."""
from __future__ import annotations

import asyncio

import pytest

from shoal.agent.app import MapReconciler
from shoal.agent.enrolment import Enroller
from shoal.agent.netns import netns_cookie, tc_ingress_programs
from shoal.agent.zdslink import ZdsProxyLink
from shoal.config import PORT_OUTBOUND
from shoal.datapath.origdst import OriginalDestinations
from shoal.xds import model as m
from shoal.xds.state import ConfigState
from shoal.zds import ZdsServer
from tests.agent.agentbed import InPodProxy, finish, pod_programs, serve_once

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


class PodNetnsOfBed:
    def __init__(self, bed):
        self.paths = {"a": bed.a.netns_path, "b": bed.b.netns_path}

    def netns_path(self, workload):
        return self.paths[workload.name]


def workload(bed, name: str, meshed: bool, identity: int) -> m.Workload:
    pod = getattr(bed, name)
    return m.Workload(uid=f"uid-{name}", name=name, namespace="t", service_account=name, node="node-1",
                      ip=pod.ip, identity=identity, spiffe_id=f"spiffe://cluster.local/ns/t/sa/{name}",
                      meshed=meshed)


async def wait_for(predicate, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_enrol_and_unenrol_follow_the_config(agent_bed, datapath, tmp_path):
    dp, maps = datapath
    handler = InPodProxy()
    server = ZdsServer(tmp_path / "zds.sock", handler)
    await server.start()
    link = ZdsProxyLink(tmp_path / "zds.sock")
    state = ConfigState()
    enroller = Enroller("node-1", maps, pod_programs(dp, agent_bed), PodNetnsOfBed(agent_bed), tmp_path / "state.json", link)
    link_task = asyncio.create_task(link.run(enroller.replay))
    try:
        await wait_for(lambda: link.connected)
        state.apply(m.ConfigDelta("1", upserted=(workload(agent_bed, "a", True, 3001),
                                                 workload(agent_bed, "b", False, 3002))))
        await enroller.reconcile(state.all_workloads())
        cookie = await asyncio.to_thread(netns_cookie, agent_bed.a.netns_path)
        assert set(maps.pods()) == {cookie}
        assert await asyncio.to_thread(tc_ingress_programs, agent_bed.a.netns_path)
        assert pod_programs(dp, agent_bed).link_pin(cookie).exists()      # sk_lookup linked
        assert not await asyncio.to_thread(tc_ingress_programs, agent_bed.b.netns_path)
        assert ("add", "uid-a") in handler.events

        # captured: a's connect lands on the proxy's in-pod 15001 with its original destination
        client = agent_bed.a.connect(agent_bed.b.ip, 8080, wait=False)
        conn, _ = await asyncio.to_thread(serve_once, handler.listeners["uid-a"][PORT_OUTBOUND])
        with OriginalDestinations(agent_bed.pin_dir) as dests:
            assert dests.lookup(conn) == (agent_bed.b.ip, 8080)
        await asyncio.to_thread(finish, client)
        conn.close()

        # a restarted agent adopts the enrolled pods from the state file
        again = Enroller("node-1", maps, pod_programs(dp, agent_bed), PodNetnsOfBed(agent_bed), tmp_path / "state.json", link)
        assert set(again.enrolled) == {"uid-a"}

        # the label flips: unenrol everything, live
        state.apply(m.ConfigDelta("2", upserted=(workload(agent_bed, "a", False, 3001),)))
        await enroller.reconcile(state.all_workloads())
        assert maps.pods() == {}
        assert not await asyncio.to_thread(tc_ingress_programs, agent_bed.a.netns_path)
        assert not pod_programs(dp, agent_bed).link_pin(cookie).exists()
        assert ("del", "uid-a") in handler.events
        app = agent_bed.b.listen(8383)
        client = agent_bed.a.connect(agent_bed.b.ip, 8383, wait=False)
        conn, _ = await asyncio.to_thread(serve_once, app)
        assert (await asyncio.to_thread(finish, client))["peer"] == [agent_bed.b.ip, 8383]
        conn.close()
        app.close()
    finally:
        await enroller.remove_all()
        link_task.cancel()
        await asyncio.gather(link_task, return_exceptions=True)
        await server.close()


async def test_enrolment_waits_for_the_proxy_and_replays_on_reconnect(agent_bed, datapath, tmp_path):
    dp, maps = datapath
    link = ZdsProxyLink(tmp_path / "zds.sock", max_backoff=0.2)
    state = ConfigState()
    state.apply(m.ConfigDelta("1", upserted=(workload(agent_bed, "a", True, 3001),)))
    enroller = Enroller("node-1", maps, pod_programs(dp, agent_bed), PodNetnsOfBed(agent_bed), tmp_path / "state.json", link)
    await enroller.reconcile(state.all_workloads())
    assert maps.pods() == {} and "uid-a" in enroller.failures   # no proxy: deferred, nothing half-done
    handler = InPodProxy()
    server = ZdsServer(tmp_path / "zds.sock", handler)
    await server.start()
    link_task = asyncio.create_task(link.run(enroller.replay))
    try:
        await wait_for(lambda: link.connected)
        await enroller.reconcile(state.all_workloads())
        assert len(maps.pods()) == 1 and not enroller.failures
        # the proxy restarts: it gets the pod again, then the snapshot marker
        await server.close()
        handler.crash()
        handler2 = InPodProxy()
        server = ZdsServer(tmp_path / "zds.sock", handler2)
        await server.start()
        await wait_for(lambda: ("snapshot", "") in handler2.events)
        assert handler2.events[0] == ("add", "uid-a")
        handler2.crash()
    finally:
        await enroller.remove_all()
        link_task.cancel()
        await asyncio.gather(link_task, return_exceptions=True)
        await server.close()


def test_map_reconciler_compiles_config_into_maps(agent_bed, datapath):
    _dp, maps = datapath
    state = ConfigState()
    reconciler = MapReconciler("node-1", state, maps)
    state.subscribe(reconciler.sync)
    a, b = workload(agent_bed, "a", True, 3001), workload(agent_bed, "b", True, 3002)
    service = m.Service(name="db", namespace="t", vip="10.96.9.9",
                        ports=(m.ServicePort("tcp", 7000, 7001),), endpoints=("uid-b",))
    deny = m.Authorization(name="no-a", namespace="t", action="DENY",
                           selector=m.Labels({}),
                           rules=(m.Rule(sources=(m.Source(principals=("cluster.local/ns/t/sa/a",)),),
                                         operations=(m.Operation(ports=(7001,)),)),))
    try:
        state.apply(m.ConfigDelta("1", upserted=(a, b, service)))
        assert maps.endpoints()[agent_bed.a.ip].identity == 3001
        assert maps.services() == {("10.96.9.9", 7000, 6): ((agent_bed.b.ip, 7001),)}
        assert maps.policies() == {}
        state.apply(m.ConfigDelta("2", upserted=(deny,)))
        entries = maps.policies()
        # selector {} selects both a and b in namespace t
        assert {(e.src_identity, e.dst_identity, e.dport) for e in entries} == {(3001, 3001, 7001), (3001, 3002, 7001)}
        assert reconciler.last_sync_seconds < 1.0
        state.apply(m.ConfigDelta("3", removed=("authorization/t/no-a", "service/t/db")))
        assert maps.policies() == {} and maps.services() == {}
    finally:
        maps.sync_policies({})
        maps.sync_services({})
        maps.sync_endpoints({})
