"""`python -m shoal.agent --node node-1`: the node agent."""
from __future__ import annotations

import asyncio
import logging
import sys

from shoal.agent.config import parse_config
from shoal.agent.loader import ProgramLoadError


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from shoal.agent.app import AgentApp
    try:
        asyncio.run(AgentApp(config).run())
    except ProgramLoadError as err:
        print(f"shoal-agent: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
