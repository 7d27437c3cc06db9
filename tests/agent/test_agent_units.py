"""Pure parts of the agent: the policy/map compiler, flow decoding, struct layouts, config."""
from __future__ import annotations

import ctypes

import pytest

from shoal.agent import compiler
from shoal.agent.config import AgentConfig
from shoal.datapath.structs import C_MIRRORS, Addr, FlowRecord
from shoal.flows.kernel import MalformedRecord, decode
from shoal.xds import model as m


def wl(name, ns="demo", sa=None, ip="10.244.1.2", identity=100, node="node-1", meshed=True, labels=None):
    return m.Workload(uid=f"{ns}/{name}", name=name, namespace=ns, service_account=sa or name, node=node, ip=ip,
                      identity=identity, spiffe_id=f"spiffe://cluster.local/ns/{ns}/sa/{sa or name}",
                      meshed=meshed, labels=m.Labels(labels or {"app": name}))


CLIENT = wl("client-0", sa="client", ip="10.244.1.2", identity=100)
DB = wl("db-0", sa="db", ip="10.244.2.2", identity=200, node="node-2", labels={"app": "db"})
LEGACY = wl("client-0", ns="legacy", sa="default", ip="10.244.1.4", identity=300, meshed=False)
ALL = [CLIENT, DB, LEGACY]


def deny(rules, selector=None, ns="demo", name="deny-db"):
    return m.Authorization(name=name, namespace=ns, action="DENY", selector=m.Labels({"app": "db"} if selector is None else selector),
                           rules=tuple(rules))


def both(src, dst, port):
    """A DENY entry holds for TCP and UDP alike."""
    return {compiler.PolicyEntry(src, dst, port, 6), compiler.PolicyEntry(src, dst, port, 17)}


def test_deny_by_principal_and_port_compiles_to_identity_keys():
    policy = deny([m.Rule(sources=(m.Source(principals=("cluster.local/ns/demo/sa/client",)),),
                          operations=(m.Operation(ports=(7000,)),))])
    entries, skipped = compiler.deny_entries([policy], ALL)
    assert set(entries) == both(100, 200, 7000)
    assert set(entries.values()) == {compiler.rule_id(policy)} and not skipped


def test_deny_by_namespace_covers_every_identity_of_the_namespace_and_any_port():
    policy = deny([m.Rule(sources=(m.Source(namespaces=("legacy",)),))])
    entries, _ = compiler.deny_entries([policy], ALL)
    assert set(entries) == both(300, 200, 0)


def test_rule_without_sources_denies_any_source():
    entries, _ = compiler.deny_entries([deny([m.Rule(operations=(m.Operation(ports=(7000, 7001)),))])], ALL)
    assert set(entries) == both(0, 200, 7000) | both(0, 200, 7001)


@pytest.mark.parametrize("rule", [
    m.Rule(operations=(m.Operation(methods=("GET",)),)),
    m.Rule(sources=(m.Source(ip_blocks=("10.0.0.0/8",)),)),
    m.Rule(sources=(m.Source(not_namespaces=("demo",)),)),
    m.Rule(sources=(m.Source(principals=("*",)),)),
    m.Rule(conditions=(m.Condition("request.headers[x]", ("1",)),)),
])
def test_non_l4_rules_are_left_to_the_proxy(rule):
    entries, skipped = compiler.deny_entries([deny([rule])], ALL)
    assert entries == {} and skipped and skipped[0].policy == "demo/deny-db"


def test_allow_policies_and_ruleless_deny_compile_to_nothing():
    allow = m.Authorization(name="a", namespace="demo", action="ALLOW", rules=(m.Rule(),))
    entries, _ = compiler.deny_entries([allow, deny([])], ALL)
    assert entries == {}


def test_selector_narrower_than_an_identity_is_not_compiled():
    twin = wl("db-1", sa="db", ip="10.244.2.9", identity=200, labels={"app": "db", "canary": "yes"})
    policy = deny([m.Rule()], selector={"canary": "yes"})
    entries, skipped = compiler.deny_entries([policy], ALL + [twin])
    assert entries == {} and "narrower" in skipped[0].reason


def test_mesh_wide_policy_from_the_root_namespace():
    policy = deny([m.Rule(sources=(m.Source(namespaces=("legacy",)),))], selector={}, ns="shoal-system")
    entries, _ = compiler.deny_entries([policy], ALL)
    assert {e.dst_identity for e in entries} == {100, 200, 300}


def test_services_resolve_endpoints_to_target_ports():
    web0, web1 = wl("web-0", ip="10.244.1.3", identity=5), wl("web-1", ip="10.244.2.3", identity=5, node="node-2")
    service = m.Service(name="web", namespace="demo", vip="10.96.0.20",
                        ports=(m.ServicePort("http", 8080, 8080), m.ServicePort("alt", 80, 8080)),
                        endpoints=("demo/web-0", "demo/web-1", "demo/gone"))
    out = compiler.services([service], {w.uid: w for w in (web0, web1)})
    assert out == {("10.96.0.20", 8080, 6): (("10.244.1.3", 8080), ("10.244.2.3", 8080)),
                   ("10.96.0.20", 80, 6): (("10.244.1.3", 8080), ("10.244.2.3", 8080))}


def test_dual_stack_and_udp_services_pair_each_vip_with_backends_of_its_family():
    web0 = m.Workload(uid="demo/web-0", name="web-0", namespace="demo", service_account="web", node="node-1",
                      ip="10.244.1.3", ips=("10.244.1.3", "fd00:10:244:1::3"), identity=5, spiffe_id="x", meshed=True)
    web1 = wl("web-1", ip="10.244.2.3", identity=5)          # IPv4 only
    service = m.Service(name="dns", namespace="demo", vip="10.96.0.10", vips=("10.96.0.10", "fd00:10:96::a"),
                        ports=(m.ServicePort("dns", 53, 5353, "UDP"), m.ServicePort("dns-tcp", 53, 5353, "TCP"),
                               m.ServicePort("sctp", 9, 9, "SCTP")),
                        endpoints=("demo/web-0", "demo/web-1"))
    out = compiler.services([service], {w.uid: w for w in (web0, web1)})
    assert out == {("10.96.0.10", 53, 17): (("10.244.1.3", 5353), ("10.244.2.3", 5353)),
                   ("10.96.0.10", 53, 6): (("10.244.1.3", 5353), ("10.244.2.3", 5353)),
                   ("fd00:10:96::a", 53, 17): (("fd00:10:244:1::3", 5353),),
                   ("fd00:10:96::a", 53, 6): (("fd00:10:244:1::3", 5353),)}


def test_endpoints_mark_meshed_and_local():
    out = compiler.endpoints(ALL, "node-1")
    assert out["10.244.1.2"].flags == 3 and out["10.244.2.2"].flags == 1 and out["10.244.1.4"].flags == 2
    assert out["10.244.1.2"].ns_id == out["10.244.2.2"].ns_id != out["10.244.1.4"].ns_id
    strict = m.Workload(uid="demo/s-0", name="s-0", namespace="demo", service_account="s", node="node-1",
                        ip="10.244.1.9", ips=("10.244.1.9", "fd00:10:244:1::9"), identity=9, spiffe_id="x",
                        meshed=True, mtls_mode="STRICT")
    out = compiler.endpoints([strict], "node-1")
    assert out["10.244.1.9"] == out["fd00:10:244:1::9"] and out["10.244.1.9"].flags == 1 | 2 | 4


@pytest.mark.parametrize("resource", [
    wl("x", ip="not-an-ip"),
    wl("x", identity=2),
    m.Service(name="s", namespace="demo", vip="10.96.0.1", ports=(m.ServicePort("p", 0, 80),)),
    m.Service(name="s", namespace="demo", vip="nope"),
    m.Authorization(name="p", namespace="demo", action="MAYBE"),
    deny([m.Rule(operations=(m.Operation(ports=(70000,)),))]),
])
def test_malformed_resources_are_rejected(resource):
    with pytest.raises(ValueError):
        compiler.validate(resource)


def test_flow_record_decodes_and_rejects_garbage():
    record = FlowRecord(ts_ns=5, src_ip=Addr.of("10.244.1.4"), dst_ip=Addr.of("fd00:10:244::2"),
                        src_port=40000, dst_port=7000, src_identity=300, dst_identity=200, protocol=6,
                        verdict=2, direction=1, kind=3, tcp_flags=2, drop_reason=181)
    event = decode(bytes(record))
    assert (event.src_ip, event.dst_ip, event.dst_port, event.verdict, event.direction, event.kind,
            event.drop_reason, event.protocol) == ("10.244.1.4", "fd00:10:244::2", 7000, "DROPPED", "INGRESS",
                                                   "tc", 181, "TCP")
    with pytest.raises(MalformedRecord):
        decode(b"\x00" * 8)
    record.verdict = 99
    with pytest.raises(MalformedRecord):
        decode(bytes(record))


@pytest.mark.root
def test_c_structs_match_the_ctypes_mirrors():
    """Compile (not load) a unit with static asserts on every struct's size and field offsets."""
    from bcc import BPF

    from shoal import bpf
    asserts = [f"_Static_assert(sizeof(struct {name}) == {ctypes.sizeof(mirror)}, \"{name}\");"
               for name, mirror in C_MIRRORS.items()]
    # ... and every field at the same offset (struct shoal_addr's bytes are named w in C, b here)
    asserts += [f"_Static_assert(__builtin_offsetof(struct {name}, {field}) == {getattr(mirror, field).offset}, "
                f"\"{name}.{field}\");"
                for name, mirror in C_MIRRORS.items() if name != "shoal_addr" for field, *_ in mirror._fields_]
    asserts = "\n".join(asserts)
    text = f'#include "lib/shoal.h"\n{asserts}\nint noop(void *ctx) {{ return 0; }}\n'
    BPF(text=text.encode(), cflags=[f"-I{bpf.SOURCE_DIR}", '-DSHOAL_PIN_DIR="/nonexistent"']).cleanup()


@pytest.mark.parametrize("argv", [["--node", "web"], ["--node", "node-1", "--metrics-port", "0"]])
def test_config_rejects_bad_flags(argv):
    with pytest.raises(SystemExit):
        AgentConfig.from_args(argv)


def test_config_from_flags_and_env(monkeypatch):
    monkeypatch.setenv("SHOAL_CLUSTER", "c1")
    config = AgentConfig.from_args(["--node", "node-2"])
    assert str(config.pin_dir) == "/sys/fs/bpf/c1/node-2"
    assert config.node_cgroup.name == "node-2" and config.controller == "172.18.0.1:15012"


def test_cost_histogram_buckets_and_quantiles():
    from shoal.agent.mapsync import cost_bucket_bounds, histogram_quantile

    def bucket_of(ns: int) -> int:   # the kernel's formula, in Python
        log2 = max(ns.bit_length() - 1, 0)
        return ns if log2 < 2 else log2 * 4 + ((ns >> (log2 - 2)) & 3)
    for ns in (0, 1, 3, 4, 7, 1000, 1023, 1024, 1300, 2047, 10**6):
        low, high = cost_bucket_bounds(bucket_of(ns))
        assert low <= ns < high, ns
    buckets = [0] * 128
    buckets[bucket_of(1100)] = 90
    buckets[bucket_of(50_000)] = 10
    assert 1024 <= histogram_quantile(buckets, 0.5) < 1280
    assert histogram_quantile(buckets, 0.99) > 40_000
    assert histogram_quantile([0] * 128, 0.5) is None


@pytest.mark.root
def test_pinned_map_with_another_layout_is_replaced_on_adoption(tmp_path):
    import os
    import shutil
    from pathlib import Path

    from shoal.agent.loader import PinnedMaps
    from shoal.datapath import bpfsys
    from shoal.datapath.structs import MAP_BY_NAME
    if not Path("/sys/fs/bpf").is_mount():
        pytest.skip("bpffs not mounted")
    pin_dir = Path(f"/sys/fs/bpf/shoal-t{os.getpid()}-maps/node-1")
    try:
        first = PinnedMaps(pin_dir)
        first.close()
        spec = MAP_BY_NAME["cost_hist"]
        (pin_dir / "cost_hist").unlink()
        old = bpfsys.map_create(spec.map_type, spec.key_size, spec.value_size, 32, "cost_hist")
        bpfsys.obj_pin(old, pin_dir / "cost_hist")
        os.close(old)
        again = PinnedMaps(pin_dir)
        assert again.replaced == ["cost_hist"] and "ipcache" in again.adopted
        assert bpfsys.map_info(again.fds["cost_hist"]).max_entries == spec.max_entries
        again.close()
    finally:
        shutil.rmtree(pin_dir.parent, ignore_errors=True)


def test_policies_attached_to_a_waypoint_or_service_stay_out_of_the_kernel():
    policy = m.Authorization(name="l7", namespace="demo", action="DENY",
                             rules=(m.Rule(sources=(m.Source(namespaces=("legacy",)),)),),
                             target_refs=(m.TargetRef(kind="Service", name="db"),))
    entries, _ = compiler.deny_entries([policy], ALL)
    assert entries == {}
