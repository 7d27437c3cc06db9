"""The agent's config: flags and environment, bad flags refused."""
from __future__ import annotations

import pytest

from shoal.agent.config import AgentConfig


@pytest.mark.parametrize("argv", [["--node", "web"], ["--node", "node-1", "--metrics-port", "0"]])
def test_config_rejects_bad_flags(argv):
    with pytest.raises(SystemExit):
        AgentConfig.from_args(argv)



def test_config_from_flags_and_env(monkeypatch):
    monkeypatch.setenv("SHOAL_CLUSTER", "c1")
    config = AgentConfig.from_args(["--node", "node-2"])
    assert str(config.pin_dir) == "/sys/fs/bpf/c1/node-2"
    assert config.node_cgroup.name == "node-2" and config.controller == "172.18.0.1:15012"
