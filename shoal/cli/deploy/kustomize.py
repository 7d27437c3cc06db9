"""Loads the kustomize base in ``daemonset/`` without kubectl.

``shoal install --render`` must work on a machine that has no kubectl, so this reads
the small subset of kustomize the base uses: ``resources`` (files), ``labels`` (with
``includeSelectors: false``) and ``configMapGenerator`` (files, no name hash).
Anything else in a kustomization is refused, so nobody can add a feature here that
this loader would silently ignore. The test suite checks that the result equals what
``kubectl kustomize daemonset/`` prints.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION = "kustomization.yaml"
SUPPORTED_KEYS = frozenset({"apiVersion", "kind", "resources", "labels", "configMapGenerator"})
SUPPORTED_GENERATOR_KEYS = frozenset({"name", "namespace", "files", "options"})
SUPPORTED_GENERATOR_OPTIONS = frozenset({"disableNameSuffixHash", "labels", "annotations"})


class KustomizeError(ValueError):
    """The base uses something this loader does not implement, or is malformed."""


def load(base: Path) -> list[dict[str, Any]]:
    """The objects of the kustomization in ``base``, in file order."""
    path = Path(base) / KUSTOMIZATION
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise KustomizeError(f"{path}: {err}") from err
    if not isinstance(spec, dict):
        raise KustomizeError(f"{path}: expected a mapping")
    unknown = set(spec) - SUPPORTED_KEYS
    if unknown:
        raise KustomizeError(f"{path}: unsupported kustomization fields {sorted(unknown)}")

    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources") or []:
        objects.extend(_read_resource(Path(base), entry))
    for generator in spec.get("configMapGenerator") or []:
        objects.append(_config_map(Path(base), generator))
    for label_set in spec.get("labels") or []:
        _apply_labels(objects, label_set)
    return objects


def _read_resource(base: Path, entry: Any) -> list[dict[str, Any]]:
    if not isinstance(entry, str):
        raise KustomizeError(f"resources: expected file names, got {entry!r}")
    path = base / entry
    if path.is_dir():
        raise KustomizeError(f"resources: {entry} is a directory (nested kustomizations are not supported)")
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except (OSError, yaml.YAMLError) as err:
        raise KustomizeError(f"{path}: {err}") from err
    objects = [doc for doc in docs if doc is not None]
    for obj in objects:
        if not isinstance(obj, dict) or "kind" not in obj or "metadata" not in obj:
            raise KustomizeError(f"{path}: every document must be a Kubernetes object")
    return objects


def _config_map(base: Path, generator: Any) -> dict[str, Any]:
    if not isinstance(generator, dict) or set(generator) - SUPPORTED_GENERATOR_KEYS:
        raise KustomizeError(f"configMapGenerator: supported fields are {sorted(SUPPORTED_GENERATOR_KEYS)}")
    options = generator.get("options") or {}
    if set(options) - SUPPORTED_GENERATOR_OPTIONS:
        raise KustomizeError(f"configMapGenerator.options: supported are {sorted(SUPPORTED_GENERATOR_OPTIONS)}")
    if not options.get("disableNameSuffixHash"):
        # The name hash would make every reference elsewhere need rewriting.
        raise KustomizeError("configMapGenerator: only disableNameSuffixHash: true is supported")
    data = {}
    for name in generator.get("files") or []:
        key, _, file_name = name.rpartition("=") if "=" in name else (Path(name).name, "", name)
        try:
            data[key] = (base / file_name).read_text()
        except OSError as err:
            raise KustomizeError(f"configMapGenerator {generator.get('name')}: {err}") from err
    metadata: dict[str, Any] = {"name": generator["name"]}
    if generator.get("namespace"):
        metadata["namespace"] = generator["namespace"]
    if options.get("labels"):
        metadata["labels"] = dict(options["labels"])
    if options.get("annotations"):
        metadata["annotations"] = dict(options["annotations"])
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def _apply_labels(objects: list[dict[str, Any]], label_set: Any) -> None:
    if not isinstance(label_set, dict) or set(label_set) - {"pairs", "includeSelectors"}:
        raise KustomizeError("labels: supported fields are pairs and includeSelectors")
    if label_set.get("includeSelectors"):
        raise KustomizeError("labels: includeSelectors: true is not supported (selectors are immutable)")
    for obj in objects:
        labels = obj["metadata"].setdefault("labels", {})
        labels.update(label_set.get("pairs") or {})
