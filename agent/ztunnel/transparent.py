"""Inbound delivery to the app's pod IP from the client's real IP, per pod, both families.

**Why over ``lo``.** The proxy connects to the app at the pod IP (of the destination's
family) from inside the pod, with its socket bound to the ``lo`` device
(``SO_BINDTODEVICE``). The agent's sk_lookup program hands every new connection in a
meshed pod to the proxy's 15006 listener, except connections arriving on ``lo``. A
connect to the pod's own IP is delivered over ``lo``, but the kernel reports the
address's device (eth0) as its ingress unless the socket itself routed through ``lo``;
a ``lo``-bound socket does, so its SYN reaches the app's listener instead of coming
back to 15006 (the loop that once exhausted fds). Nothing in the packet is trusted: only
a socket inside the pod's namespace can route through its ``lo`` (and binding to a
device needs ``CAP_NET_RAW`` there), and pod processes' own connects are captured
earlier by the agent's connect4/connect6, keyed to the proxy's cgroup.

**Real client IP.** The delivery socket is bound to the client's IP (IP_TRANSPARENT /
IPV6_TRANSPARENT) and carries ``DELIVERY_MARK``. The app's accepted socket inherits the
SYN's mark (``net.ipv4.tcp_fwmark_accept=1``, which covers TCP over IPv6 too; RSTs of
closed ports through ``fwmark_reflect``), so every reply of the app on that connection
carries it, and a rule per family sends marked replies to a table holding only
``local 0.0.0.0/0`` / ``local ::/0`` on ``lo``: replies addressed to a remote IP come
back to the proxy's ``lo``-bound socket instead of leaving through eth0. The same rule
routes the delivery socket's own SYN through that table (IPv6 needs it; IPv4 does it by
itself). The mark only routes packets inside the pod: a pod process that sets it only
routes its own packets to itself.

The mark is the delivery's own (``DELIVERY_MARK``, not the proxy mark 0x539 its other
sockets carry): the agent's capture recognises the proxy by its cgroup, so nothing forces
the two to be one, and with its own mark the rule needs no port range. The app sees the
real client address on every port, in both families.

A connection from the pod to itself (hairpin through a Service) has the pod's own
address as client, which cannot be bound next to the app: it comes from the loopback
address of the family (it is local, after all).
"""
from __future__ import annotations

import ipaddress
import logging
import subprocess

from shoal.agent.ztunnel.netns import NetnsHandle
from shoal.zds import PodInfo

log = logging.getLogger(__name__)

DELIVERY_MARK = 0x53a          # delivery sockets, and the app sockets they made (tcp_fwmark_accept)
TABLE = 15539
RULE_PRIORITY = 15538
ANY_ADDRESS = {4: "0.0.0.0/0", 6: "::/0"}
# Earlier versions installed rules at these priorities (oif lo; mark 0x539 by port range):
# deleted on install, so a pod enrolled by an older proxy is cleaned up.
_OLD_PRIORITIES = (15537, 15539)


def _batch(remove_only: bool, version: int) -> str:
    """The ``ip -<version> -batch`` script for one family.

    Install removes only what an older version added and puts ours in place without
    ever taking it away first: a successor proxy prepares every pod again during a restart
    handover while its predecessor still delivers through this rule and table, and a
    delete-then-add left a moment in which the apps' marked replies followed the main
    table to the client pod's real address, which answered with a reset (the app saw
    ECONNRESET on its reply, the client a reset connection, in the restart-under-load
    test). So the route is replaced (atomic) and the rule added (an identical one already
    there fails with "File exists": that is done, see :func:`batch_failures`).
    ``remove_only``: take ours away too (the pod leaves the proxy)."""
    lines = [f"rule del priority {p}" for p in _OLD_PRIORITIES]
    if remove_only:
        lines += [f"rule del priority {RULE_PRIORITY}", f"route flush table {TABLE}"]
    else:
        lines.append(f"route replace local {ANY_ADDRESS[version]} dev lo table {TABLE}")
        lines.append(f"rule add priority {RULE_PRIORITY} fwmark {DELIVERY_MARK:#x}/0xffffffff lookup {TABLE}")
    return "\n".join(lines) + "\n"


def batch_failures(script: str, stderr: str) -> list[str]:
    """The commands of an ``ip -force -batch`` ``script`` that failed for real, from its
    stderr (``RTNETLINK answers: <why>`` then ``Command failed -:<line>``): a delete of
    something absent, or the add of a rule that already exists, is what we wanted."""
    commands = script.splitlines()
    failures, why = [], ""
    for line in stderr.splitlines():
        if line.startswith("Command failed"):
            number = line.rsplit(":", 1)[-1].strip()
            command = commands[int(number) - 1] if number.isdigit() and 0 < int(number) <= len(commands) else line
            absent = " del " in f" {command} " and "No such file" in why
            present = command.startswith("rule add") and "File exists" in why
            if not (absent or present):
                failures.append(f"{command}: {why or line}")
            why = ""
        else:
            why = line.removeprefix("RTNETLINK answers: ").strip()
    return failures


def _ip_batch(netns: NetnsHandle, version: int, script: str) -> list[str]:
    """Runs ``script`` for one family in the pod's namespace; returns the commands that failed."""
    # A child forked from this thread starts in the thread's (pod's) namespace.
    with netns.entered():
        done = subprocess.run(["ip", f"-{version}", "-force", "-batch", "-"], input=script,
                              capture_output=True, text=True, timeout=10)
    return batch_failures(script, done.stderr)


def _versions(addresses: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(sorted({ipaddress.ip_address(a).version for a in addresses}))


# The pod namespace's sysctls delivery relies on (both families' reflect: a pod may be
# dual-stack). A container's /proc/sys is read-only, so on a platform that runs the proxy
# in one, whoever creates the pod's namespace (the CNI step) sets them first; the proxy
# then finds them set and writes nothing (NetnsHandle.write_sysctl).
DELIVERY_SYSCTLS = ("net/ipv4/tcp_fwmark_accept", "net/ipv4/fwmark_reflect", "net/ipv6/fwmark_reflect")
# Not delivery, but set the same way: a successor proxy's SO_REUSEPORT listeners take over
# the queued connections of ours when they close (proxy.py).
HANDOVER_SYSCTL = "net/ipv4/tcp_migrate_req"


def install(netns: NetnsHandle, addresses: tuple[str, ...]) -> str | None:
    """Prepares a pod namespace for delivery to its ``addresses``; None when done, else
    why not (logged by the caller: the pod cannot be served without it)."""
    versions = _versions(addresses)
    try:
        netns.write_sysctl("net/ipv4/tcp_fwmark_accept", "1")
        # Kernel answers without a socket (the RST of a closed port) reflect the mark too,
        # so a refused delivery fails at once instead of timing out.
        for version in versions:
            netns.write_sysctl(f"net/ipv{version}/fwmark_reflect", "1")
        errors = [e for v in versions for e in _ip_batch(netns, v, _batch(False, v))]
    except (OSError, subprocess.SubprocessError) as exc:
        return f"delivery setup failed: {exc}"
    if errors:
        remove(netns, addresses)
        return f"delivery rules failed: {'; '.join(errors)}"
    return None


def remove(netns: NetnsHandle, addresses: tuple[str, ...]) -> None:
    try:
        for version in _versions(addresses):
            _ip_batch(netns, version, _batch(True, version))
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("delivery rules not removed: %s", exc)


def prepare_pod_netns(netns: NetnsHandle, pod: PodInfo) -> str | None:
    """What a pod's namespace needs before any proxy serves it; None, or why it failed."""
    try:
        # A successor proxy's (or worker's) SO_REUSEPORT listeners take over queued connections
        # when ours close, instead of the kernel resetting them (net.ipv4.tcp_migrate_req).
        netns.write_sysctl(HANDOVER_SYSCTL, "1")
    except OSError as exc:
        log.warning("tcp_migrate_req not set in %s: %s", pod.name, exc)
    problem = install(netns, pod.ips)
    return None if problem is None else f"{pod.namespace}/{pod.name}: inbound delivery: {problem}"
