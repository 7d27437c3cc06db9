"""``python -m shoal.agent.ztunnel --node node-1``: the node proxy."""
from __future__ import annotations

import os
import sys

from shoal.agent.ztunnel.config import ProxyConfig
from shoal.memdebug import start_tracing
from shoal.runtime import access_log, run_daemon


def main(argv: list[str] | None = None) -> int:
    # This process forks: the supervisor a worker whenever one exits, a worker `ip` (its
    # transparent routes). gRPC's fork handlers (on by default) then run in the child between
    # fork and exec, where they can abort it ("Check failed: next_worker->state == KICKED" in
    # ev_epoll1, seen as a worker restart counted twice); the child only execs, so it needs
    # none of them. Read when gRPC starts: set before anything imports it.
    os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"
    start_tracing()   # SHOAL_TRACEMALLOC=<frames>: /debug/memory names the lines that allocate
    config = ProxyConfig.from_args(argv)
    if not config.is_worker and not config.single_process:
        # The supervisor: no data path, so none of its modules (a lighter process).
        from shoal.agent.ztunnel import supervisor

        flags = sys.argv[1:] if argv is None else argv   # every worker runs with these
        return run_daemon(lambda: supervisor.main(config, flags), config.log_level)
    from shoal.agent.ztunnel import app

    access_log("shoal.proxy.access")   # one JSON line per closed connection, on stdout
    return run_daemon(lambda: app.main(config), config.log_level)


if __name__ == "__main__":
    sys.exit(main())
