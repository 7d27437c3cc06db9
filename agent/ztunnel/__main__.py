"""``python -m shoal.agent.ztunnel --node node-1``: the node proxy."""
from __future__ import annotations

import asyncio
import logging
import sys

from shoal.agent.ztunnel.app import main
from shoal.agent.ztunnel.config import ProxyConfig


def run(argv: list[str] | None = None) -> None:
    config = ProxyConfig.from_args(argv)
    logging.basicConfig(level=config.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("shoal.proxy.access").propagate = False
    access = logging.StreamHandler(sys.stdout)  # JSON access log: one line per closed connection
    access.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("shoal.proxy.access").addHandler(access)
    logging.getLogger("shoal.proxy.access").setLevel(logging.INFO)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(config))


if __name__ == "__main__":
    run()
