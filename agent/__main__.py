"""`python -m shoal.agent --node node-1`: the node agent."""
from __future__ import annotations

import sys

from shoal.agent.config import AgentConfig
from shoal.agent.loader import ProgramLoadError
from shoal.runtime import run_daemon


def main(argv: list[str] | None = None) -> int:
    config = AgentConfig.from_args(argv)
    from shoal.agent.app import AgentApp
    return run_daemon(lambda: AgentApp(config).run(), config.log_level,
                      fast_loop=False,                 # pyroute2: see run_daemon
                      fatal={ProgramLoadError: 2})     # the kernel refused a program: named, not retried


if __name__ == "__main__":
    sys.exit(main())
