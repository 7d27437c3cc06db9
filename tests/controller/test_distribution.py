"""Config distribution: a pre-encoded push is a valid delta response."""
from shoal.api import config_pb2 as pb
from shoal.controller.distribution import encode_push
from shoal.controller.model import encode_entry
from shoal.xds import convert
from shoal.xds import model as m


def test_pre_encoded_push_is_a_valid_delta_response():
    web = m.Workload(uid="demo/web-0", name="web-0", namespace="demo", service_account="web",
                     node="node-1", ip="10.244.1.2", identity=300, spiffe_id="spiffe://x/ns/demo/sa/web",
                     meshed=True, labels=m.Labels({"app": "web"}))
    route = m.KubeObject(kind="HTTPRoute", namespace="demo", name="r",
                         json='{"kind":"HTTPRoute","spec":{"rules":[]}}')
    entries = [encode_entry(web), encode_entry(route)]
    big = [encode_entry(m.Service(name=f"s{i}", namespace="demo", vip="10.96.0.1")) for i in range(200)]
    wire = encode_push("42", "7", [e.encoded for e in entries + big], ("workload/demo/gone",))
    push = pb.DeltaResponse.FromString(wire)
    assert push.system_version == "42" and push.nonce == "7"
    assert list(push.removed) == ["workload/demo/gone"]
    assert [r.version for r in push.resources[:2]] == [e.version for e in entries]
    assert convert.from_proto(push.resources[0]) == web
    assert convert.from_proto(push.resources[1]).body == {"kind": "HTTPRoute", "spec": {"rules": []}}
    assert len(push.resources) == 202
