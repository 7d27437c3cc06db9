"""Process start-up shared by the data-plane daemons (node proxy, waypoint)."""
from __future__ import annotations

import asyncio
import logging
import sys
from typing import Awaitable

import uvloop

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def run_daemon(main: Awaitable[None], log_level: str) -> None:
    """Logs to stderr and runs ``main`` on uvloop (the data path's event loop)."""
    logging.basicConfig(level=log_level, stream=sys.stderr, format=LOG_FORMAT)
    uvloop.install()
    asyncio.run(main)
