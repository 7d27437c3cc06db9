"""Small pure pieces: identity log, push encoding, config flags."""
import datetime as dt

import pytest

from shoal.api import config_pb2 as pb
from shoal.controller.config import ControllerConfig
from shoal.controller.distribution import encode_push
from shoal.controller.identity import FIRST_IDENTITY, IdentityAllocator
from shoal.controller.model import encode_entry
from shoal.xds import convert
from shoal.xds import model as m


def test_identity_log_survives_a_torn_line_and_never_reuses(tmp_path):
    path = tmp_path / "identities"
    ids = IdentityAllocator(path)
    a, b = ids.get("demo", "web"), ids.get("demo", "db")
    assert (a, b) == (FIRST_IDENTITY, FIRST_IDENTITY + 1)
    uncommitted = IdentityAllocator(path)
    assert len(uncommitted) == 0          # nothing is durable before commit()
    ids.commit()
    with open(path, "a") as f:
        f.write("25")                     # a crash mid-write
    again = IdentityAllocator(path)
    assert again.lookup("demo", "web") == a and again.lookup("demo", "db") == b
    assert again.get("demo", "new") == b + 1


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


def test_config_flags_and_errors(monkeypatch, capsys):
    monkeypatch.delenv("SHOAL_CLUSTER", raising=False)
    config = ControllerConfig.from_args(["--cluster", "shoal-x", "--cert-ttl", "90m", "--source", "kubernetes",
                           "--agent-service-account", "kube-system/shoal"])
    assert config.cert_ttl == dt.timedelta(minutes=90)
    assert config.ca_dir == config.layout.ca_dir and not config.run_kubelet
    assert config.agent_service_accounts == ("kube-system/shoal",)
    for bad in (["--cert-ttl", "soon"], ["--cert-ttl", "-1h"], ["--source", "etcd"]):
        with pytest.raises(SystemExit):
            ControllerConfig.from_args(bad)
    assert "not a duration" in capsys.readouterr().err
