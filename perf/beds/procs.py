"""Starting and stopping the bed's processes, by PID only."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from shoal.perf import procstat


def spawn(argv: Sequence[str], log: Path | None, env: dict[str, str] | None = None) -> "subprocess.Popen[bytes]":
    """Start ``argv`` in a session of its own so it can be stopped with its children."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)
    finally:
        if log:
            out.close()


def _group_gone(proc: "subprocess.Popen[bytes]", within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, else it stays listed as a zombie of ours
        if not procstat.pids_in_group(proc.pid):
            return True
        time.sleep(0.02)
    return False


def stop(proc: "subprocess.Popen[bytes]", grace: float = 3.0) -> None:
    """SIGTERM the process group the harness made, then SIGKILL what is left.

    Waits for the whole group, not only its leader: a server under ``shoal exec`` or a
    shell outlives its wrapper by a moment, and the next scenario may reuse its port.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break  # the group is already empty
        if _group_gone(proc, grace):
            break
    proc.poll()
