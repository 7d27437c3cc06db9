"""The CRDs: structural schemas that accept the docs' examples and refuse broken ones."""
from __future__ import annotations

import copy
import re

import jsonschema
import pytest
import yaml

from shoal.controller.manifests import validate as controller_validate
from shoal.waypoint.model import parse_traffic_policy
from tests.shoal.cli.deploy.deploybed import REPO

DOCS = REPO / "docs" / "kubernetes.md"


def crds(rendered):
    return {(o["spec"]["group"], o["spec"]["names"]["kind"]): o
            for o in rendered if o["kind"] == "CustomResourceDefinition"}


def schema_for(rendered, obj) -> dict:
    group, version = obj["apiVersion"].split("/")
    crd = crds(rendered)[(group, obj["kind"])]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return served["schema"]["openAPIV3Schema"]


def doc_examples() -> list[dict]:
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), re.S)
    return [doc for block in blocks for doc in yaml.safe_load_all(block) if doc]


def shoal_examples() -> list[dict]:
    return [d for d in doc_examples() if d["apiVersion"].split("/")[0].endswith("shoal.io")]


def structural_errors(schema: dict, path: str = "") -> list[str]:
    """The API server's structural-schema rules that can be checked offline."""
    errors = []
    preserve = schema.get("x-kubernetes-preserve-unknown-fields") or schema.get("x-kubernetes-int-or-string")
    if not schema.get("type") and not preserve:
        errors.append(f"{path or '<root>'}: no type")
    for forbidden in ("$ref", "definitions", "dependencies", "id", "patternProperties", "additionalItems"):
        if forbidden in schema:
            errors.append(f"{path}: {forbidden} is not allowed")
    if "properties" in schema and isinstance(schema.get("additionalProperties"), dict):
        errors.append(f"{path}: properties and additionalProperties are mutually exclusive")
    if "default" in schema:
        try:
            jsonschema.Draft7Validator(schema).validate(schema["default"])
        except jsonschema.ValidationError as err:
            errors.append(f"{path}: default does not validate: {err.message}")
    for name, sub in (schema.get("properties") or {}).items():
        errors.extend(structural_errors(sub, f"{path}.{name}"))
    if isinstance(schema.get("items"), dict):
        errors.extend(structural_errors(schema["items"], f"{path}[]"))
    elif "items" in schema:
        errors.append(f"{path}: items must be one schema")
    if isinstance(schema.get("additionalProperties"), dict):
        errors.extend(structural_errors(schema["additionalProperties"], f"{path}{{}}"))
    return errors


def test_crds_are_the_shoal_apis(rendered):
    assert set(crds(rendered)) == {("security.shoal.io", "AuthorizationPolicy"),
                                   ("security.shoal.io", "PeerAuthentication"),
                                   ("networking.shoal.io", "TrafficPolicy")}
    for crd in crds(rendered).values():
        assert crd["spec"]["scope"] == "Namespaced"
        assert [v["name"] for v in crd["spec"]["versions"] if v["storage"]] == ["v1"]


def test_crd_schemas_are_structural(rendered):
    for crd in crds(rendered).values():
        for version in crd["spec"]["versions"]:
            assert structural_errors(version["schema"]["openAPIV3Schema"]) == [], crd["metadata"]["name"]


def test_structural_check_can_fail():
    assert structural_errors({"type": "object", "properties": {"a": {"description": "untyped"}}}) == [".a: no type"]


def test_docs_have_an_example_of_every_shoal_kind(rendered):
    assert {d["kind"] for d in shoal_examples()} == {kind for _, kind in crds(rendered)}


def test_docs_examples_validate_against_their_crd(rendered):
    for example in shoal_examples():
        jsonschema.Draft7Validator(schema_for(rendered, example)).validate(example)


def test_docs_examples_are_accepted_by_the_code_that_reads_them():
    """The CRD and the parsers agree: the controller's validation and the waypoint's model."""
    for example in doc_examples():
        assert controller_validate(example) == [], example["metadata"]["name"]
        if example["kind"] == "TrafficPolicy":
            policy = parse_traffic_policy(example)
            assert policy.retries.attempts == example["spec"]["retries"]["attempts"]


def _example(kind: str) -> dict:
    return copy.deepcopy(next(d for d in shoal_examples() if d["kind"] == kind))


def _break(obj: dict, path: str, value) -> dict:
    node = obj
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    return obj


@pytest.mark.parametrize("kind,path,value", [
    ("AuthorizationPolicy", "spec.action", "AUDIT"),                                  # not enforced by Shoal
    ("AuthorizationPolicy", "spec.rules.0.from.0.source.requestPrincipals", ["*"]),   # rejected, not pruned
    ("AuthorizationPolicy", "spec.rules.0.to.0.operation.ports", [8080]),             # Istio: strings
    ("AuthorizationPolicy", "spec.rules.0.to.0.operation.ports", ["70000"]),
    ("AuthorizationPolicy", "spec.selector.matchLabels", {"app": 3}),
    ("PeerAuthentication", "spec.mtls.mode", "DISABLE"),
    ("TrafficPolicy", "spec.retries.attempts", 0),
    ("TrafficPolicy", "spec.retries.perTryTimeout", "soon"),
    ("TrafficPolicy", "spec.retries.retryOn", ["always"]),
    ("TrafficPolicy", "spec.targetRefs", []),
    ("TrafficPolicy", "spec.outlierDetection.maxEjectionPercent", 150),
])
def test_crd_schemas_reject_broken_resources(rendered, kind, path, value):
    broken = _break(_example(kind), path, value)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema_for(rendered, broken)).validate(broken)
