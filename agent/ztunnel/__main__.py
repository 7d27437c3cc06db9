"""``python -m shoal.agent.ztunnel --node node-1``: the node proxy."""
from __future__ import annotations

import logging
import sys

from shoal.agent.ztunnel.app import main
from shoal.agent.ztunnel.config import ProxyConfig
from shoal.runtime import run_daemon


def run(argv: list[str] | None = None) -> None:
    config = ProxyConfig.from_args(argv)
    # The JSON access log (one line per closed connection) goes to stdout, apart from the logs.
    access_log = logging.getLogger("shoal.proxy.access")
    access_log.propagate = False
    access = logging.StreamHandler(sys.stdout)
    access.setFormatter(logging.Formatter("%(message)s"))
    access_log.addHandler(access)
    access_log.setLevel(logging.INFO)
    run_daemon(lambda: main(config, argv=sys.argv[1:] if argv is None else argv), config.log_level)


if __name__ == "__main__":
    run()
