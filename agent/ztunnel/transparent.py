"""Inbound delivery with the client's real source IP (IP_TRANSPARENT), per pod.

The proxy connects to the app from inside the pod with a transparent socket bound to
the client's IP. The app's replies are then addressed to a remote IP and would leave
through eth0; they must come back to the proxy over ``lo`` instead. The app's accepted
socket inherits the proxy's SYN mark (``net.ipv4.tcp_fwmark_accept=1``; RSTs from closed
ports via ``fwmark_reflect``), so its replies carry the proxy mark, and a policy rule sends marked replies to a ``local`` route.

The proxy's *other* sockets carry the same mark (the agent's capture skips exactly that
mark), so the rule also keys on the source port: app replies come from the app's port,
the proxy's own connections from ephemeral ports (>= 32768) or 15006/15008. Hence the
rule ranges below, and transparency only for app ports inside them (else the app sees
the pod's own IP, as without this module). IPv4 only for now.
"""
from __future__ import annotations

import logging
import subprocess

from shoal.agent.ztunnel.netns import NetnsHandle
from shoal.config import PROXY_MARK

log = logging.getLogger(__name__)

TABLE = 15539
RULES = ((15538, 1, 15000), (15539, 15009, 32767))  # (priority, first sport, last sport)
EPHEMERAL_FLOOR = 32768


def port_supported(port: int) -> bool:
    return any(first <= port <= last for _, first, last in RULES)


def _batch(remove_only: bool) -> str:
    lines = [f"rule del priority {priority}" for priority, _, _ in RULES]
    lines.append(f"route flush table {TABLE}")
    if not remove_only:
        lines += [f"rule add priority {priority} fwmark {PROXY_MARK:#x}/0xffffffff sport {first}-{last} "
                  f"lookup {TABLE}" for priority, first, last in RULES]
        lines.append(f"route add local 0.0.0.0/0 dev lo table {TABLE}")
    return "\n".join(lines) + "\n"


def _ip_batch(netns: NetnsHandle, script: str) -> subprocess.CompletedProcess:
    # A child forked from this thread starts in the thread's (pod's) namespace.
    with netns.entered():
        return subprocess.run(["ip", "-force", "-batch", "-"], input=script, capture_output=True, text=True,
                              timeout=10)


def install(netns: NetnsHandle) -> bool:
    """Prepare a pod namespace for transparent delivery; False (and why, logged) if not."""
    try:
        with netns.entered():
            with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
                floor = int(f.read().split()[0])
        if floor < EPHEMERAL_FLOOR:
            log.warning("transparent delivery off: ephemeral ports start at %d (< %d)", floor, EPHEMERAL_FLOOR)
            return False
        netns.write_sysctl("net/ipv4/tcp_fwmark_accept", "1")
        # Kernel answers without a socket (the RST of a closed port) reflect the mark too,
        # so a refused transparent connect fails at once instead of timing out.
        netns.write_sysctl("net/ipv4/fwmark_reflect", "1")
        done = _ip_batch(netns, _batch(remove_only=False))
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        log.warning("transparent delivery off: %s", exc)
        return False
    # -force keeps going past the deletes of rules that did not exist yet; the adds must work.
    errors = [line for line in done.stderr.splitlines() if "add" in line or "File exists" in line]
    if errors:
        log.warning("transparent delivery off: %s", "; ".join(errors))
        _ip_batch(netns, _batch(remove_only=True))
        return False
    return True


def remove(netns: NetnsHandle) -> None:
    try:
        _ip_batch(netns, _batch(remove_only=True))
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("transparent rules not removed: %s", exc)
