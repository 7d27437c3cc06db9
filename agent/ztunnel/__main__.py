"""``python -m shoal.agent.ztunnel --node node-1``: the node proxy."""
from __future__ import annotations

import sys

from shoal.agent.ztunnel import app
from shoal.agent.ztunnel.config import ProxyConfig
from shoal.runtime import access_log, run_daemon


def main(argv: list[str] | None = None) -> int:
    config = ProxyConfig.from_args(argv)
    access_log("shoal.proxy.access")   # one JSON line per closed connection, on stdout
    # A supervisor (--workers > 1) starts each worker with these same flags.
    flags = sys.argv[1:] if argv is None else argv
    return run_daemon(lambda: app.main(config, argv=flags), config.log_level)


if __name__ == "__main__":
    sys.exit(main())
