"""``python -m shoal.waypoint --name waypoint --namespace demo``: one waypoint (L7 proxy)."""
from __future__ import annotations

import sys

from shoal.runtime import run_daemon

from . import app
from .config import WaypointConfig


def main(argv: list[str] | None = None) -> int:
    config = WaypointConfig.from_args(argv)
    return run_daemon(lambda: app.main(config), config.log_level)


if __name__ == "__main__":
    sys.exit(main())
