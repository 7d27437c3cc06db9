"""``python -m shoal.waypoint --name waypoint --namespace demo``: one waypoint (L7 proxy)."""
from __future__ import annotations

import asyncio
import logging
import sys

from .app import main
from .config import WaypointConfig


def run(argv: list[str] | None = None) -> None:
    config = WaypointConfig.from_args(argv)
    logging.basicConfig(level=config.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(config))


if __name__ == "__main__":
    run()
