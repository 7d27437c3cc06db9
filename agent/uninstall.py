"""Removes a node's data path: cgroup programs, tc filters in enrolled pods, pins, state.

`shoal down` calls remove_node(layout, node) for every node; it is idempotent and
works whether or not the agent is running (it reads only pins and the state file).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from shoal.agent.loader import detach_cgroup
from shoal.agent.netns import NetnsError, detach_tc_ingress
from shoal.config import ClusterLayout

log = logging.getLogger(__name__)


def enrolment_state_path(layout: ClusterLayout, node: str) -> Path:
    return layout.enrolment_state(node)


def enrolled_netns(layout: ClusterLayout, node: str) -> list[str]:
    try:
        raw = json.loads(enrolment_state_path(layout, node).read_text())
    except (FileNotFoundError, ValueError):
        return []
    return [pod["netns_path"] for pod in raw.get("pods", []) if isinstance(pod, dict) and "netns_path" in pod]


def remove_node(layout: ClusterLayout, node: str) -> list[str]:
    """Detach and unpin everything the agent of `node` installed; returns what was removed."""
    removed: list[str] = []
    pin_dir = layout.bpf_pin_dir(node)
    if pin_dir.exists():
        removed += [f"{node} {item}" for item in detach_cgroup(pin_dir, layout.node_cgroup(node))]
    for netns_path in enrolled_netns(layout, node):
        try:
            if detach_tc_ingress(netns_path):
                removed.append(f"tc filter in {netns_path}")
        except (NetnsError, OSError) as err:
            log.warning("tc detach in %s: %s", netns_path, err)
    if pin_dir.exists():
        shutil.rmtree(pin_dir)   # unlinking pins drops the last references to maps and programs
        removed.append(f"bpf pins {pin_dir}")
    state = enrolment_state_path(layout, node)
    if state.exists():
        state.unlink()
        removed.append(f"enrolment state {state}")
    return removed
