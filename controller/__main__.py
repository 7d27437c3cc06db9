"""``python -m shoal.controller``"""
import asyncio
import logging

from shoal.controller.app import ControllerApp
from shoal.controller.config import parse_config


def main() -> None:
    config = parse_config()
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(ControllerApp(config).run())


if __name__ == "__main__":
    main()
