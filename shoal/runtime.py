"""One start-up for all four daemons (agent, node proxy, controller, waypoint).

Each daemon's ``__main__`` builds its one frozen config (``<Daemon>Config.from_args``)
and hands its main coroutine here: the same log format on stderr, the same event loop
(uvloop, the data path's; the agent keeps asyncio's, see ``run_daemon``). Each app
installs its own SIGTERM/SIGINT handlers to drain; this only starts and runs the loop.
"""
from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, Callable, Coroutine

import uvloop

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def run_daemon(main: Callable[[], Coroutine[Any, Any, None]], log_level: str, *, fast_loop: bool = True) -> None:
    """Logs to stderr at ``log_level`` (any case), then runs ``main()`` on uvloop.

    ``main`` is called only once logging is set up, so what an app logs while it is
    built (CA loaded, token created) is not lost. ``fast_loop=False`` keeps asyncio's own
    loop: the agent's pyroute2 talks netlink through asyncio datagram endpoints, which
    uvloop refuses for AF_NETLINK ("cannot open a UDP handle, invalid family 16").
    """
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr, format=LOG_FORMAT)
    if fast_loop:
        uvloop.install()
    asyncio.run(main())
