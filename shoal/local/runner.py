"""The local cluster's process monitor, what conmon is to a container: ``shoal up`` starts
each component (controller, agents, node proxies) through one, which starts the component,
waits for it, and appends how it ended to the component's own log.

A component killed by a signal leaves no line of its own: SIGKILL (the OOM killer's, or
``kill -9``) cannot be caught, and a crash below Python may write nothing. Nothing else
waits for these processes (``shoal up`` returns once they run), so without this their log
just stopped, where Kubernetes would show the container's last state (exit code 137,
``OOMKilled``). The line says which process ended and how: its exit code, or the signal
and the exit code a container runtime would report for it.

The monitor lives in a cgroup of its own beside the nodes' (``runners``), never in its
component's: the component's cgroup holds only the component (perf reads its processes
there), and a kill of that cgroup (``shoal crash``) leaves the monitor to write the line.

``python -m shoal.local.runner NAME LOG -- COMMAND...``: prints the component's pid on
stdout, once it runs, and closes stdout; exits with the component's exit code.
"""
from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from typing import Sequence

from shoal.exits import container_exit_code, exit_description

LOGGER = "shoal.local.runner"


def ended_line(name: str, pid: int, returncode: int, uptime: float) -> str:
    """The line that says how ``name`` ended, in the daemons' log format."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now % 1 * 1000):03d}"
    level = "INFO" if returncode == 0 else "ERROR"
    detail = ""
    if returncode < 0:
        detail = f" (exit code {container_exit_code(returncode)}, as a container's last state shows it"
        if -returncode == signal.SIGKILL:
            detail += "; the OOM killer's signal, or a kill -9, which no process can log itself"
        detail += ")"
    return f"{stamp} {level} {LOGGER} {name} (pid {pid}) {exit_description(returncode)} after {uptime:.0f} s{detail}\n"


def run(name: str, log_path: str, command: Sequence[str]) -> int:
    """Start ``command`` with its output appended to ``log_path``, report its pid, wait for
    it and append how it ended. Its return code."""
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd="/")
    started = time.monotonic()
    # A stop of the cluster signals everything in it, this monitor too: it stays to write the
    # line of the component, which ends by that signal (a SIGKILL still ends both).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(process.pid, flush=True)
    with contextlib.suppress(OSError):   # the caller read the pid and went away
        sys.stdout.close()
    returncode = process.wait()
    line = ended_line(name, process.pid, returncode, time.monotonic() - started)
    try:
        with open(log_path, "a") as log:
            log.write(line)
    except OSError:   # `shoal down` removed the log folder: the cluster is gone
        pass
    return container_exit_code(returncode)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 4 or args[2] != "--":
        print("usage: python -m shoal.local.runner NAME LOG -- COMMAND...", file=sys.stderr)
        return 2
    return run(args[0], args[1], args[3:])


if __name__ == "__main__":
    sys.exit(main())
