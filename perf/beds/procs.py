"""Starting and stopping the bed's processes, by PID only."""
from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path


def spawn(argv: Sequence[str], log: Path | None, env: dict[str, str] | None = None) -> "subprocess.Popen[bytes]":
    """Start ``argv`` in a session of its own so it can be stopped with its children."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)
    finally:
        if log:
            out.close()


def stop(proc: "subprocess.Popen[bytes]", grace: float = 3.0) -> None:
    """SIGTERM the process group the harness made, then SIGKILL what is left."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
