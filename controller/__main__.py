"""``python -m shoal.controller``"""
import asyncio
import logging
import sys

from shoal.controller.app import ControllerApp, LeadershipLost
from shoal.controller.config import parse_config
from shoal.controller.kubestate import CASecretError


def main() -> None:
    config = parse_config()
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(ControllerApp(config).run())
    except CASecretError as err:
        logging.getLogger("shoal.controller").critical("%s", err)
        sys.exit(2)
    except LeadershipLost as err:
        logging.getLogger("shoal.controller").error("%s", err)
        sys.exit(1)


if __name__ == "__main__":
    main()
