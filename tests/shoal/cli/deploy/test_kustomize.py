"""The Python kustomize subset: same output as kubectl, and loud about what it lacks."""
from __future__ import annotations

import subprocess

import pytest
import yaml

from shoal.cli.deploy.kustomize import KustomizeError, load

CM = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  namespace: ns\ndata:\n  k: v\n"


def write_base(tmp_path, kustomization: str):
    (tmp_path / "cm.yaml").write_text(CM)
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "d.json").write_text('{"x": 1}\n')
    (tmp_path / "kustomization.yaml").write_text(kustomization)
    return tmp_path


GOOD = """
resources: [cm.yaml]
labels:
  - pairs: {team: mesh}
    includeSelectors: false
configMapGenerator:
  - name: gen
    namespace: ns
    files: [files/d.json, renamed.json=files/d.json]
    options: {disableNameSuffixHash: true, labels: {g: "1"}, annotations: {note: hello}}
"""


def test_subset_matches_kubectl(tmp_path, kubectl):
    base = write_base(tmp_path, GOOD)
    done = subprocess.run([kubectl, "kustomize", str(base)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(load(base), key=key) == sorted((o for o in yaml.safe_load_all(done.stdout) if o), key=key)
    gen = next(o for o in load(base) if o["metadata"]["name"] == "gen")
    assert set(gen["data"]) == {"d.json", "renamed.json"}


@pytest.mark.parametrize("kustomization,message", [
    ("resources: [cm.yaml]\npatches: []\n", "unsupported kustomization fields"),
    ("resources: [cm.yaml]\nlabels: [{pairs: {a: b}, includeSelectors: true}]\n", "includeSelectors"),
    ("configMapGenerator: [{name: g, files: [files/d.json]}]\n", "disableNameSuffixHash"),
    ("configMapGenerator: [{name: g, literals: [a=b], options: {disableNameSuffixHash: true}}]\n", "supported fields"),
    ("configMapGenerator: [{name: g, files: [nope.json], options: {disableNameSuffixHash: true}}]\n", "nope.json"),
    ("resources: [files]\n", "directory"),
    ("resources: [missing.yaml]\n", "missing.yaml"),
    ("- not a mapping\n", "expected a mapping"),
])
def test_unsupported_or_broken_kustomizations_are_refused(tmp_path, kustomization, message):
    with pytest.raises(KustomizeError, match=message):
        load(write_base(tmp_path, kustomization))
