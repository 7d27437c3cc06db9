"""Per-pod network-namespace operations: tc and sk_lookup attach/detach inside it.

Entering a namespace and reading its cookie live in ``shoal.netns`` (the local kubelet
uses them too); they are re-exported here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from shoal.netns import (  # noqa: F401 - in_netns/netns_cookie/NetnsError re-exported for the agent's modules
    NetnsError,
    in_netns,
    netns_cookie,
    setns,
    socket_netns_cookie,
)

TC_FILTER_NAME = "shoal_tc_ingress"
TC_PRIORITY = 1
TC_INGRESS_PARENT = 0xFFFFFFF2   # clsact ingress hook
T = TypeVar("T")

def _with_iproute(netns_path: Path | str, action: Callable[[IPRoute], T]) -> T:
    """Run action(ipr) with a netlink socket opened inside the namespace.

    The socket is made on a thread that entered the namespace (pyroute2's NetNS forks a
    helper process instead, and forking a process that runs gRPC threads is unsafe).
    """
    if not Path(netns_path).exists():
        raise NetnsError(f"network namespace {netns_path} does not exist")

    def run() -> T:
        with IPRoute() as ipr:
            return action(ipr)
    return in_netns(netns_path, run)


def _ifindex(ipr: IPRoute, ifname: str, netns_path) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetnsError(f"no interface {ifname} in {netns_path}")
    return found[0]


def attach_tc_ingress(netns_path: Path | str, prog_fd: int, ifname: str = "eth0") -> None:
    """Attach (or atomically replace) the steering program on ifname's ingress, in the namespace."""
    def attach(ipr: IPRoute) -> None:
        index = _ifindex(ipr, ifname, netns_path)
        try:
            ipr.tc("add", "clsact", index)
        except NetlinkError as err:
            if err.code != 17:  # EEXIST: already there (adoption, or another tool's clsact)
                raise
        ipr.tc("replace-filter", "bpf", index, fd=prog_fd, name=TC_FILTER_NAME,
               parent=TC_INGRESS_PARENT, prio=TC_PRIORITY, handle=1, protocol=0x0003, classid=1,
               direct_action=True)
    try:
        _with_iproute(netns_path, attach)
    except NetlinkError as err:
        raise NetnsError(f"tc attach in {netns_path} failed: {err}") from err


def tc_ingress_filters(ipr: IPRoute, ifname: str = "eth0", netns_path: Path | str = "") -> list[tuple[str, int]]:
    """(name, program id) of each bpf filter on ifname's ingress, through a netlink socket
    already opened in the pod's namespace (the capture audit's one trip into it)."""
    index = _ifindex(ipr, ifname, netns_path)
    found = []
    for msg in ipr.get_filters(index=index, parent=TC_INGRESS_PARENT):
        options = msg.get_attr("TCA_OPTIONS")
        if options is not None and options.get_attr("TCA_BPF_NAME"):
            found.append((options.get_attr("TCA_BPF_NAME"), options.get_attr("TCA_BPF_ID") or 0))
    return found


def tc_ingress_programs(netns_path: Path | str, ifname: str = "eth0") -> list[str]:
    """Names of bpf filters on ifname's ingress (for debug and tests)."""
    return [name for name, _ in _with_iproute(netns_path, lambda ipr: tc_ingress_filters(ipr, ifname, netns_path))]


def detach_tc_ingress(netns_path: Path | str, ifname: str = "eth0") -> bool:
    """Remove our clsact (and with it the filter); False when there was nothing."""
    if not Path(netns_path).exists():
        return False

    def detach(ipr: IPRoute) -> bool:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return False
        try:
            ipr.tc("del", "clsact", found[0])
        except NetlinkError as err:
            if err.code in (2, 22):  # ENOENT / EINVAL: no clsact
                return False
            raise
        return True
    return _with_iproute(netns_path, detach)


def attach_sk_lookup(netns_path: Path | str, prog_fd: int, link_pin: Path) -> None:
    """Link the sk_lookup program to the namespace, pinned at link_pin (it outlives the
    agent); an existing link gets the new program atomically (adoption)."""
    from shoal.datapath import bpfsys
    link_pin = Path(link_pin)
    if link_pin.exists():
        link_fd = bpfsys.obj_get(link_pin)
        try:
            bpfsys.link_update(link_fd, prog_fd)
            return
        except bpfsys.BpfError:   # a link whose namespace is gone: make a new one
            link_pin.unlink()
        finally:
            os.close(link_fd)
    try:
        ns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise NetnsError(f"network namespace {netns_path} does not exist") from err
    try:
        link_fd = bpfsys.link_create(prog_fd, ns_fd, bpfsys.ATTACH_SK_LOOKUP)
    finally:
        os.close(ns_fd)
    try:
        link_pin.parent.mkdir(parents=True, exist_ok=True)
        bpfsys.obj_pin(link_fd, link_pin)
    finally:
        os.close(link_fd)


def detach_sk_lookup(link_pin: Path) -> bool:
    """Unpinning the (otherwise unreferenced) link detaches it."""
    link_pin = Path(link_pin)
    if not link_pin.exists():
        return False
    link_pin.unlink()
    return True
