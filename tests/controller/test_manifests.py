"""Apply-time validation of manifests: a bad object is refused naming the object and the field."""
from __future__ import annotations

from shoal.controller.manifests import validate


def test_apply_refuses_a_bad_security_context():
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "ns"},
           "spec": {"containers": [{"name": "c", "command": ["true"],
                                    "securityContext": {"capabilities": {"add": ["ALL_OF_THEM"]}}}]}}
    assert any("unknown capabilities ALL_OF_THEM" in problem for problem in validate(bad))
