"""How a process ended, in words, for the line whoever waited for it writes (the node
proxy's supervisor for its workers, the local cluster's runner for its components).

A process killed by a signal leaves no line of its own (SIGKILL, the OOM killer's, cannot
be caught), so its parent's line is the only trace of why it went."""
from __future__ import annotations

import signal


def exit_description(returncode: int) -> str:
    """From a return code as subprocess and asyncio give it (minus the signal that killed
    the process)."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"was killed by {name}"


def container_exit_code(returncode: int) -> int:
    """The exit code a container runtime (and Kubernetes' last state) reports: 128 + the
    signal for a process a signal killed (137 for SIGKILL)."""
    return returncode if returncode >= 0 else 128 - returncode
