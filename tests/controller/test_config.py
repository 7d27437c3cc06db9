"""The controller's config: flags, environment and their errors."""
import datetime as dt

import pytest

from shoal.controller.config import ControllerConfig


def test_config_flags_and_errors(monkeypatch, capsys):
    monkeypatch.delenv("SHOAL_CLUSTER", raising=False)
    config = ControllerConfig.from_args(["--cluster", "shoal-x", "--cert-ttl", "90m", "--source", "kubernetes",
                           "--agent-service-account", "kube-system/shoal"])
    assert config.cert_ttl == dt.timedelta(minutes=90)
    assert config.ca_dir == config.layout.ca_dir and not config.run_kubelet
    assert config.agent_service_accounts == ("kube-system/shoal",)
    for bad in (["--cert-ttl", "soon"], ["--cert-ttl", "-1h"], ["--source", "etcd"]):
        with pytest.raises(SystemExit):
            ControllerConfig.from_args(bad)
    assert "not a duration" in capsys.readouterr().err
