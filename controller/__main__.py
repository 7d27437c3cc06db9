"""``python -m shoal.controller``: the controller (the local cluster runs ``shoal.local.controller``,
which assembles the same app through ``main``)."""
from __future__ import annotations

import sys
from typing import Callable

from shoal.controller.app import ControllerApp, LeadershipLost
from shoal.controller.config import ControllerConfig
from shoal.controller.kubestate import CASecretError
from shoal.runtime import run_daemon


def main(argv: list[str] | None = None,
         assemble: Callable[[ControllerConfig], ControllerApp] = ControllerApp) -> int:
    """``assemble`` builds the app from its config (an assembler hands in its own parts)."""
    config = ControllerConfig.from_args(argv)
    return run_daemon(lambda: assemble(config).run(), config.log_level,
                      fatal={CASecretError: 2,     # the CA Secret cannot be used: a restart will not help
                             LeadershipLost: 1})   # stopped issuing: restart to rejoin as a standby


if __name__ == "__main__":
    sys.exit(main())
