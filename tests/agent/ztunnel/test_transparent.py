"""The delivery rules of transparent.py: preparing a pod again (a successor proxy does it
during a restart handover) never takes away the rule or route its predecessor delivers
through, and ip's batch errors are told apart from what was wanted."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from shoal.agent.ztunnel import transparent
from shoal.agent.ztunnel.netns import NetnsHandle

RULE = f"{transparent.RULE_PRIORITY}:\tfrom all fwmark {transparent.DELIVERY_MARK:#x} lookup {transparent.TABLE}"


def test_install_script_deletes_nothing_of_ours():
    for version in (4, 6):
        script = transparent._batch(False, version)
        assert f"rule del priority {transparent.RULE_PRIORITY}" not in script
        assert "flush" not in script and "route replace local" in script
        removal = transparent._batch(True, version)
        assert f"rule del priority {transparent.RULE_PRIORITY}" in removal and "flush" in removal


def test_batch_failures_keeps_only_real_ones():
    script = transparent._batch(False, 4)
    lines = script.splitlines()
    add = lines.index(next(line for line in lines if line.startswith("rule add"))) + 1
    replace = lines.index(next(line for line in lines if line.startswith("route replace"))) + 1
    wanted = ("RTNETLINK answers: No such file or directory\nCommand failed -:1\n"
              f"RTNETLINK answers: File exists\nCommand failed -:{add}\n")
    assert transparent.batch_failures(script, wanted) == []
    broken = f"RTNETLINK answers: Operation not permitted\nCommand failed -:{replace}\n"
    assert transparent.batch_failures(script, broken) == [f"{lines[replace - 1]}: Operation not permitted"]
    # a rule that cannot be added for another reason is a failure too
    other = f"RTNETLINK answers: Invalid argument\nCommand failed -:{add}\n"
    assert transparent.batch_failures(script, other) == [f"{lines[add - 1]}: Invalid argument"]


@pytest.fixture
def pod_netns():
    name = f"shoal-test-{os.getpid()}-transparent"
    subprocess.run(["ip", "netns", "add", name], check=True)
    home = NetnsHandle.current()
    handle = NetnsHandle.from_path(f"/run/netns/{name}", home)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name, handle
    finally:
        handle.close()
        subprocess.run(["ip", "netns", "del", name], check=True)


def _rules(name: str, version: int) -> str:
    return subprocess.run(["ip", f"-{version}", "-n", name, "rule"], capture_output=True, text=True,
                          check=True).stdout


def _events_during(name: str, action) -> str:
    """What ``ip monitor`` reports about rules and routes in ``name`` while ``action`` runs."""
    monitor = subprocess.Popen(["ip", "-n", name, "monitor", "rule", "route"], stdout=subprocess.PIPE,
                               text=True)
    try:
        time.sleep(0.5)   # monitoring before the action
        action()
        time.sleep(0.5)
    finally:
        monitor.terminate()
    return monitor.communicate(timeout=10)[0]


def test_preparing_a_pod_again_never_removes_its_rule(pod_netns):
    name, netns = pod_netns
    addresses = ("10.9.0.2", "fd00:9::2")
    assert transparent.install(netns, addresses) is None
    for version in (4, 6):
        assert RULE in _rules(name, version)
    again = _events_during(name, lambda: transparent.install(netns, addresses))   # the successor's turn
    assert "Deleted" not in again, again
    for version in (4, 6):
        assert RULE in _rules(name, version)
    removal = _events_during(name, lambda: transparent.remove(netns, addresses))  # the monitor sees deletions
    assert "Deleted" in removal, removal
    for version in (4, 6):
        assert str(transparent.RULE_PRIORITY) not in _rules(name, version)
