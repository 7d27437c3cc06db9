"""``python -m shoal.waypoint --name waypoint --namespace demo``: one waypoint (L7 proxy)."""
from __future__ import annotations

from shoal.runtime import run_daemon

from .app import main
from .config import WaypointConfig


def run(argv: list[str] | None = None) -> None:
    config = WaypointConfig.from_args(argv)
    run_daemon(lambda: main(config), config.log_level)


if __name__ == "__main__":
    run()
