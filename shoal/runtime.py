"""One start-up for all four daemons (agent, node proxy, controller, waypoint).

Each daemon's ``__main__`` has the same shape: ``main(argv) -> exit code`` builds its one
frozen config (``<Daemon>Config.from_args``) and hands its main coroutine to ``run_daemon``
here: the same log format on stderr, the same event loop (uvloop, the data path's; the
agent keeps asyncio's, see ``run_daemon``), the same way out on a fatal error (logged,
then the daemon's own exit code). A daemon that writes an access log gets it from
``access_log``: one JSON line per line of output, apart from the logs. Each app installs
its own SIGTERM/SIGINT handlers to drain; this only starts and runs the loop.
"""
from __future__ import annotations

import asyncio
import faulthandler
import logging
import sys
from types import MappingProxyType
from typing import Any, Callable, Coroutine, Mapping

import uvloop

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def setup_logging(log_level: str) -> None:
    """The daemons' log lines on stderr, at ``log_level`` (any case)."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr, format=LOG_FORMAT)


def run_daemon(main: Callable[[], Coroutine[Any, Any, None]], log_level: str, *, fast_loop: bool = True,
               fatal: Mapping[type[BaseException], int] = MappingProxyType({})) -> int:
    """Logs to stderr at ``log_level``, runs ``main()`` on uvloop; the process's exit code.

    ``main`` is called only once logging is set up, so what an app logs while it is
    built (CA loaded, token created) is not lost. ``fast_loop=False`` keeps asyncio's own
    loop: the agent's pyroute2 talks netlink through asyncio datagram endpoints, which
    uvloop refuses for AF_NETLINK ("cannot open a UDP handle, invalid family 16").
    A fatal signal (SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL) dumps every thread's
    traceback to stderr first (``faulthandler``).
    ``fatal`` maps the errors a daemon stops on by design (a CA Secret it cannot use, a lost
    Lease, programs the kernel refuses) to its exit code: logged as critical, not a traceback.
    """
    setup_logging(log_level)
    # A crash below Python (libuv's abort() on an fd closed behind its back, a SIGSEGV in
    # an extension) would end the daemon without a line: the traceback of every thread
    # goes to the log instead (issue 18: a node proxy died mid-burst, its log just stopped).
    faulthandler.enable(file=sys.stderr, all_threads=True)
    if fast_loop:
        uvloop.install()
    try:
        asyncio.run(main())
    except tuple(fatal) as err:
        logging.getLogger("shoal.runtime").critical("%s", err)
        return next(code for kind, code in fatal.items() if isinstance(err, kind))
    return 0


def access_log(name: str, target: str = "-") -> Callable[[str], None]:
    """The logger ``name`` writing bare lines (no log format) to stdout (``-``) or the file
    ``target``, apart from the logs on stderr; returns its ``info``."""
    logger = logging.getLogger(name)
    logger.propagate = False
    handler = logging.StreamHandler(sys.stdout) if target == "-" else logging.FileHandler(target)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    return logger.info
