"""``python -m shoal.controller``: the controller (the local cluster runs ``shoal.local.controller``)."""
import logging
import sys

from shoal.controller.app import ControllerApp, LeadershipLost
from shoal.controller.config import ControllerConfig
from shoal.controller.kubestate import CASecretError
from shoal.runtime import run_daemon


def main() -> None:
    config = ControllerConfig.from_args()
    try:
        run_daemon(lambda: ControllerApp(config).run(), config.log_level)
    except CASecretError as err:
        logging.getLogger("shoal.controller").critical("%s", err)
        sys.exit(2)
    except LeadershipLost as err:
        logging.getLogger("shoal.controller").error("%s", err)
        sys.exit(1)


if __name__ == "__main__":
    main()
