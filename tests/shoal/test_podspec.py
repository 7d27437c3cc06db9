"""A pod's securityContext and hostPath volumes read as Kubernetes defines them; a bad one is
refused naming the field (the controller's apply-time check: tests/controller/test_manifests.py)."""
from __future__ import annotations

import pytest

from shoal.podspec import HostMount, PodSecurity, PodSpecError, validate_pod_spec

DEFAULT_UID = 200_007


def pod(spec_ctx=None, **container) -> dict:
    spec = {"containers": [{"name": "c", "command": ["true"], **container}]}
    if spec_ctx is not None:
        spec["securityContext"] = spec_ctx
    return {"metadata": {"namespace": "ns", "name": "p"}, "spec": spec}


def security(p: dict, env=None) -> PodSecurity:
    return PodSecurity.for_container(p, p["spec"]["containers"][0], DEFAULT_UID, env)


def test_no_security_context_is_the_default_uid_with_no_capabilities_and_no_new_privileges():
    sec = security(pod())
    assert (sec.uid, sec.gid, sec.capabilities, sec.no_new_privs, sec.privileged) == (DEFAULT_UID, DEFAULT_UID,
                                                                                       (), True, False)


def test_container_security_context_overrides_the_pods():
    sec = security(pod({"runAsUser": 1000, "runAsGroup": 3000}, securityContext={"runAsUser": 2000}))
    assert (sec.uid, sec.gid) == (2000, 3000)
    assert security(pod({"runAsUser": 0})).uid == 0


@pytest.mark.parametrize("ctx, message", [
    ({"runAsUser": "root"}, "runAsUser: expected an integer"),
    ({"runAsUser": -1}, "runAsUser: expected an integer"),
    ({"runAsUser": True}, "runAsUser: expected an integer"),
    ({"capabilities": {"add": ["NET_ADMIN", "FLY"]}}, "unknown capabilities FLY"),
    ({"capabilities": {"add": "NET_ADMIN"}}, "expected a list of capability names"),
    ({"capabilities": []}, "capabilities: expected a mapping"),
    ({"allowPrivilegeEscalation": "yes"}, "expected true or false"),
])
def test_bad_security_context_is_refused_naming_the_field(ctx, message):
    with pytest.raises(PodSpecError, match=message):
        security(pod(securityContext=ctx))
    problems = validate_pod_spec(pod(securityContext=ctx)["spec"])
    assert len(problems) == 1 and message.split(":")[0] in problems[0]


def test_host_path_volumes_with_sub_path_expr():
    p = pod(volumeMounts=[{"name": "run", "mountPath": "/run/node/flows.sock", "subPathExpr": "$(NODE_NAME)/flows.sock"}])
    p["spec"]["volumes"] = [{"name": "run", "hostPath": {"path": "/run/shoal/c1"}}]
    sec = security(p, {"NODE_NAME": "node-2"})
    assert sec.mounts == (HostMount("/run/shoal/c1/node-2/flows.sock", "/run/node/flows.sock", False),)
    assert PodSecurity.from_json(sec.to_json()) == sec
    p["spec"]["containers"][0]["volumeMounts"][0]["subPathExpr"] = "../../etc"
    with pytest.raises(PodSpecError, match="without '..'"):
        security(p)
    p["spec"]["volumes"] = [{"name": "run", "configMap": {"name": "x"}}]
    with pytest.raises(PodSpecError, match="only hostPath and emptyDir volumes"):
        security(p)


def test_an_empty_dir_is_the_pods_own_private_tmp_and_nowhere_else():
    """A container image's emptyDir (the waypoint's /tmp): the sandbox's private tmpfs is
    already there, so it needs no host mount; anywhere else it could not be honoured."""
    p = pod(volumeMounts=[{"name": "tmp", "mountPath": "/tmp"}])
    p["spec"]["volumes"] = [{"name": "tmp", "emptyDir": {}}]
    assert security(p).mounts == ()
    p["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] = "/var/lib/data"
    with pytest.raises(PodSpecError, match="an emptyDir can only be mounted on /tmp"):
        security(p)
