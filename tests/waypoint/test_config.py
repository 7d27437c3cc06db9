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
