"""Targeted policies survive the wire and are picked by the waypoint, not by workloads."""
import pytest

from shoal.api import config_pb2 as pb
from shoal.xds import convert
from shoal.xds import model as m


def test_target_refs_round_trip_and_are_validated():
    policy = m.Authorization(name="p", namespace="demo", action="DENY",
                             target_refs=(m.TargetRef(kind="Gateway", name="waypoint"),))
    wire = convert.to_proto(policy)
    assert convert.from_proto(pb.Resource.FromString(wire.SerializeToString())) == policy
    wire.authorization.target_refs[0].kind = "Pod"
    with pytest.raises(ValueError, match=r"target_refs\[0\]\.kind"):
        convert.from_proto(wire)
