"""The waypoint's config: flags and environment, read once into a frozen dataclass."""
from __future__ import annotations

import pytest

from shoal.hbone.handshakes import HandshakeLimits
from shoal.waypoint.config import WaypointConfig

BASE = ["--name", "waypoint", "--namespace", "demo"]


def test_the_hbone_listeners_handshake_limits_are_the_node_proxys_flags():
    assert WaypointConfig.from_args(BASE, env={}).handshake_limits == HandshakeLimits()
    config = WaypointConfig.from_args(BASE + ["--max-handshakes-per-source", "16", "--max-handshakes", "64",
                                              "--handshake-failures", "4", "--handshake-failure-window", "30",
                                              "--abuser-penalty", "5", "--abuser-longest-penalty", "120",
                                              "--handshake-timeout", "2.5"], env={})
    assert config.handshake_limits == HandshakeLimits(16, 64, 4, 30.0, 5.0, 120.0, timeout=2.5)


@pytest.mark.parametrize("argv", [["--max-handshakes-per-source", "0"], ["--max-handshakes", "10"],
                                  ["--handshake-failures", "-3"], ["--abuser-penalty", "0"],
                                  ["--handshake-timeout", "0"]])
def test_bad_handshake_limits_are_refused_naming_the_flag(argv, capsys):
    with pytest.raises(SystemExit):
        WaypointConfig.from_args(BASE + argv, env={})
    assert argv[0] in capsys.readouterr().err


@pytest.mark.parametrize("address,served", [("127.0.0.1:8080", ("127.0.0.1", 8080)), ("[::1]:8080", ("::1", 8080)),
                                            (":8080", ("127.0.0.1", 8080)), ("127.0.0.9:80", ("127.0.0.9", 80))])
def test_the_plaintext_door_is_off_by_default_and_loopback_when_asked_for(address, served):
    assert WaypointConfig.from_args(BASE, env={}).plaintext_address is None
    assert WaypointConfig.from_args(BASE + ["--plaintext", address], env={}).plaintext_address == served


@pytest.mark.parametrize("address", ["0.0.0.0:8080", "[::]:8080", "10.244.1.5:8080", "[fd00::5]:8080", "web:8080"])
def test_a_plaintext_door_other_pods_could_reach_is_a_usage_error_unless_asked_for(address, capsys):
    """Plain HTTP has no identity: on a pod-reachable address it would bypass the mesh's
    mTLS. Only a benchmark outside any mesh (perf's waypoint scenario) says so explicitly."""
    with pytest.raises(SystemExit):
        WaypointConfig.from_args(BASE + ["--plaintext", address], env={})
    assert f"--plaintext {address} is reachable beyond this host" in capsys.readouterr().err
    config = WaypointConfig.from_args(BASE + ["--plaintext", address, "--plaintext-beyond-loopback"], env={})
    assert config.plaintext_address is not None and config.plaintext_address[1] == 8080
