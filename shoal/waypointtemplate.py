"""Fills the waypoint template (ConfigMap ``shoal-waypoint-template``) for one Gateway.

The controller calls ``instantiate(template_text, gateway)`` for every Gateway of
class ``shoal-waypoint`` and applies the result in the Gateway's namespace. Values
are substituted into parsed string fields only, never into YAML text, so a Gateway
name cannot inject structure.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import yaml  # type: ignore[import-untyped]  # no stubs installed (types-PyYAML is not a dependency)

from shoal.config import WAYPOINT_GATEWAY_CLASS

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_UID = re.compile(r"^[0-9a-fA-F-]{1,64}$")
_PLACEHOLDER = re.compile(r"\$\{([A-Z_]+)\}")


class WaypointTemplateError(ValueError):
    """The Gateway cannot be turned into a waypoint, or the template is broken."""


def template_values(gateway: Mapping[str, Any]) -> dict[str, str]:
    """The template's variables for ``gateway``, after checking it is one of ours."""
    if not isinstance(gateway, Mapping) or gateway.get("kind") != "Gateway":
        raise WaypointTemplateError("expected a Gateway object")
    meta = gateway.get("metadata") or {}
    name, namespace, uid = meta.get("name"), meta.get("namespace"), meta.get("uid")
    where = f"Gateway {namespace}/{name}"
    class_name = (gateway.get("spec") or {}).get("gatewayClassName")
    if class_name != WAYPOINT_GATEWAY_CLASS:
        raise WaypointTemplateError(f"{where}: gatewayClassName is {class_name!r}, not {WAYPOINT_GATEWAY_CLASS!r}")
    for field, value in (("metadata.name", name), ("metadata.namespace", namespace)):
        if not isinstance(value, str) or len(value) > 63 or not _DNS_LABEL.match(value):
            raise WaypointTemplateError(f"{where}: {field} must be a DNS label (a-z, 0-9, '-', at most 63)")
    if not isinstance(uid, str) or not _UID.match(uid):
        raise WaypointTemplateError(f"{where}: metadata.uid is required (the owner reference needs it)")
    return {"GATEWAY_NAME": str(name), "GATEWAY_NAMESPACE": str(namespace), "GATEWAY_UID": str(uid)}


def instantiate(template_text: str, gateway: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ServiceAccount, Deployment and Service that run the waypoint for ``gateway``."""
    values = template_values(gateway)
    try:
        docs = [doc for doc in yaml.safe_load_all(template_text) if doc]
    except yaml.YAMLError as err:
        raise WaypointTemplateError(f"waypoint template: {err}") from err

    def fill(node: Any) -> Any:
        if isinstance(node, str):
            return _PLACEHOLDER.sub(lambda m: _lookup(values, m.group(1)), node)
        if isinstance(node, dict):
            return {fill(key): fill(value) for key, value in node.items()}
        if isinstance(node, list):
            return [fill(item) for item in node]
        return node

    return [fill(doc) for doc in docs]


def _lookup(values: dict[str, str], key: str) -> str:
    try:
        return values[key]
    except KeyError:
        raise WaypointTemplateError(f"waypoint template: unknown variable ${{{key}}}") from None
