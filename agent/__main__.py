"""`python -m shoal.agent --node node-1`: the node agent."""
from __future__ import annotations

import sys

from shoal.agent.config import AgentConfig
from shoal.agent.loader import ProgramLoadError
from shoal.runtime import run_daemon


def main(argv: list[str] | None = None) -> int:
    config = AgentConfig.from_args(argv)
    from shoal.agent.app import AgentApp
    try:
        run_daemon(lambda: AgentApp(config).run(), config.log_level, fast_loop=False)  # pyroute2: see run_daemon
    except ProgramLoadError as err:
        print(f"shoal-agent: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
