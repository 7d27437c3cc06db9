"""The node proxy's config: flags and environment, read once into a frozen dataclass."""
from __future__ import annotations

import dataclasses

import pytest

from shoal.agent.ztunnel.config import ProxyConfig


def test_environment_of_the_local_cluster():
    config = ProxyConfig.from_args([], env={"SHOAL_NODE": "node-2", "SHOAL_CLUSTER": "c1",
                                            "SHOAL_CONTROLLER": "172.18.0.1:15012", "SHOAL_TOKEN_FILE": "/t",
                                            "SHOAL_CERT_TTL": "600"})
    assert (config.node, config.layout.name, config.controller, config.token_file) == \
        ("node-2", "c1", "172.18.0.1:15012", "/t")
    assert config.cert_ttl_seconds == 600
    assert config.zds_path.endswith("/c1/node-2/zds.sock") and config.flows_path.endswith("/c1/node-2/flows/flows.sock")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.node = "x"


def test_flags_win_over_environment():
    config = ProxyConfig.from_args(["--node", "node-1", "--drain-grace", "5"], env={"SHOAL_NODE": "node-9"})
    assert config.node == "node-1" and config.drain_grace == 5


@pytest.mark.parametrize("argv", [[], ["--node", "n", "--cert-ttl", "-1"], ["--node", "n", "--handshake-timeout", "0"],
                                  ["--node", "n", "--admin-port", "x"], ["--node", "n", "--overload-target", "-1"],
                                  ["--node", "n", "--overload-interval", "0"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        ProxyConfig.from_args(argv, env={})


def test_shedding_on_delay_from_flags_or_environment():
    assert (ProxyConfig.from_args(["--node", "n"], env={}).overload_target,
            ProxyConfig.from_args(["--node", "n"], env={}).overload_interval) == (1.0, 10.0)
    config = ProxyConfig.from_args(["--node", "n", "--overload-interval", "5"],
                                   env={"SHOAL_PROXY_OVERLOAD_TARGET": "0"})
    assert (config.overload_target, config.overload_interval) == (0.0, 5.0)


def test_workers_default_to_the_cores_this_process_may_use():
    import os

    assert ProxyConfig.from_args(["--node", "n"], env={}).workers == len(os.sched_getaffinity(0))
    assert ProxyConfig.from_args(["--node", "n"], env={"SHOAL_PROXY_WORKERS": "3"}).workers == 3
    one = ProxyConfig.from_args(["--node", "n", "--workers", "1"], env={"SHOAL_PROXY_WORKERS": "3"})
    assert one.workers == 1 and not one.is_worker
    worker = ProxyConfig.from_args(["--node", "n", "--workers", "2", "--worker", "1:7:8"], env={})
    assert worker.is_worker and (worker.worker_index, worker.worker_channel_fd, worker.worker_feed_fd) == (1, 7, 8)


@pytest.mark.parametrize("argv", [["--node", "n", "--workers", "-1"], ["--node", "n", "--worker", "x"], ["--node", "n", "--worker", "1:7"]])
def test_bad_worker_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        ProxyConfig.from_args(argv, env={})


def test_the_handshake_limits_of_15008_are_flags():
    from shoal.hbone.handshakes import HandshakeLimits

    assert ProxyConfig.from_args(["--node", "n"], env={}).handshake_limits == HandshakeLimits()
    config = ProxyConfig.from_args(["--node", "n", "--max-handshakes-per-source", "16", "--max-handshakes", "64",
                                    "--handshake-failures", "4", "--abuser-penalty", "5",
                                    "--handshake-timeout", "3.5"], env={})
    assert config.handshake_limits == HandshakeLimits(per_source=16, total=64, failures=4, penalty=5.0, timeout=3.5)


@pytest.mark.parametrize("argv", [["--max-handshakes-per-source", "0"], ["--max-handshakes", "10"],
                                  ["--handshake-failure-window", "0"], ["--abuser-longest-penalty", "1"],
                                  ["--handshake-timeout", "-1"]])
def test_bad_handshake_limits_are_refused_naming_the_flag(argv, capsys):
    with pytest.raises(SystemExit):
        ProxyConfig.from_args(["--node", "n", *argv], env={})
    assert argv[0] in capsys.readouterr().err
