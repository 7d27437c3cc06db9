"""One start-up for all four daemons (agent, node proxy, controller, waypoint).

Each daemon's ``__main__`` builds its one frozen config (``<Daemon>Config.from_args``)
and hands its main coroutine here: the same log format on stderr, the same event loop
(uvloop, the data path's), the same exit on SIGTERM/SIGINT (each app installs its own
handlers to drain; this only starts and runs the loop).
"""
from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, Callable, Coroutine

import uvloop

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def run_daemon(main: Callable[[], Coroutine[Any, Any, None]], log_level: str) -> None:
    """Logs to stderr at ``log_level`` (any case), then runs ``main()`` on uvloop.

    ``main`` is called only once logging is set up, so what an app logs while it is
    built (CA loaded, token created) is not lost."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr, format=LOG_FORMAT)
    uvloop.install()
    asyncio.run(main())
