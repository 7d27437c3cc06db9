"""The dual-stack model contract: every address of a workload/Service on the config stream,
IPv4 first, with the single-address fields kept as the primary (backwards compatible)."""
import pytest

from shoal.api import config_pb2 as pb
from shoal.xds import convert
from shoal.xds import model as m

from .conftest import make_workload


def round_trip(resource):
    return convert.from_proto(pb.Resource.FromString(convert.to_proto(resource, "v").SerializeToString()))


def test_single_address_objects_keep_their_meaning():
    wl = make_workload(ip="10.244.1.2")
    assert wl.ips == ("10.244.1.2",) and wl.address(m.IPV6) == ""
    svc = m.Service(name="web", namespace="demo", vip="10.96.0.10")
    assert svc.vips == ("10.96.0.10",)
    assert svc.ip_families == (m.IPV4,) and svc.ip_family_policy == m.SINGLE_STACK
    headless = m.Service(name="h", namespace="demo", vip="")
    assert headless.vips == () and headless.ip_families == ()


def test_addresses_are_ipv4_first_and_the_primary_is_kept():
    wl = make_workload(ip="fd00:10:244:1::2", ips=("fd00:10:244:1::2", "10.244.1.2"))
    assert wl.ips == ("10.244.1.2", "fd00:10:244:1::2")
    assert wl.ip == "fd00:10:244:1::2"          # Kubernetes' podIP: the primary family
    assert wl.address(m.IPV4) == "10.244.1.2" and wl.address(m.IPV6) == "fd00:10:244:1::2"
    only_list = make_workload(ip="", ips=("fd00::5", "10.0.0.5"))
    assert only_list.ip == "10.0.0.5"
    svc = m.Service(name="web", namespace="demo", vip="fd00:96::a", vips=("fd00:96::a", "10.96.0.10"),
                    ip_family_policy=m.REQUIRE_DUAL_STACK)
    assert svc.vips == ("10.96.0.10", "fd00:96::a")
    assert svc.ip_families == (m.IPV6, m.IPV4)   # derived: the primary's family first
    assert m.ip_family("::ffff:10.1.2.3") == m.IPV4   # the data path's one path for mapped


def test_dual_stack_round_trip_and_older_senders():
    wl = make_workload(ips=("10.244.1.2", "fd00:10:244:1::2"))
    svc = m.Service(name="web", namespace="demo", vip="10.96.0.10",
                    vips=("10.96.0.10", "fd00:96::a"), ip_families=(m.IPV4, m.IPV6),
                    ip_family_policy=m.PREFER_DUAL_STACK, ports=(m.ServicePort("http", 80, 8080),))
    wp = m.Waypoint(name="wp", namespace="demo", ip="10.244.1.50", service_account="wp",
                    spiffe_id="spiffe://cluster.local/ns/demo/sa/wp", ips=("10.244.1.50", "fd00::50"))
    for resource in (wl, svc, wp):
        assert round_trip(resource) == resource
    # An older sender sets only ip/vip: the receiver fills the lists.
    old = convert.to_proto(make_workload())
    del old.workload.ips[:]
    assert convert.from_proto(old).ips == ("10.244.1.2",)
    old_svc = convert.to_proto(m.Service(name="web", namespace="demo", vip="10.96.0.10"))
    del old_svc.service.vips[:], old_svc.service.ip_families[:]
    old_svc.service.ip_family_policy = ""
    decoded = convert.from_proto(old_svc)
    assert decoded.vips == ("10.96.0.10",) and decoded.ip_family_policy == m.SINGLE_STACK


def _svc_proto(**fields):
    resource = convert.to_proto(m.Service(name="web", namespace="demo", vip="10.96.0.10",
                                          vips=("10.96.0.10", "fd00:96::a")))
    for name, value in fields.items():
        field = getattr(resource.service, name)
        if isinstance(value, list):
            del field[:]
            field.extend(value)
        else:
            setattr(resource.service, name, value)
    return resource


@pytest.mark.parametrize("resource, message", [
    (_svc_proto(ip_families=["IPv5"]), r"service/demo/web.ip_families\[0\]: 'IPv5'"),
    (_svc_proto(ip_families=["IPv4"]), r"vips: fd00:96::a is not of ip_families"),
    (_svc_proto(ip_families=["IPv4", "IPv4"]), r"names a family twice"),
    (_svc_proto(ip_family_policy="MaybeDualStack"), r"ip_family_policy: 'MaybeDualStack'"),
    (_svc_proto(vips=["10.96.0.10", "10.96.0.11"]), r"vips: more than one IPv4"),
    (_svc_proto(vips=["10.96.0.11", "fd00:96::a"]), r"vips: does not hold the primary vip"),
    (_svc_proto(vips=["10.96.0.10", "not-an-ip"]), r"vips\[1\]: invalid IP address"),
])
def test_bad_dual_stack_fields_are_refused_by_name(resource, message):
    with pytest.raises(ValueError, match=message):
        convert.from_proto(resource)


def test_bad_workload_addresses_are_refused_by_name():
    resource = convert.to_proto(make_workload(ips=("10.244.1.2", "fd00::2")))
    resource.workload.ips.append("fd00::3")
    with pytest.raises(ValueError, match=r"workload/demo/web-0.ips: more than one IPv6"):
        convert.from_proto(resource)
