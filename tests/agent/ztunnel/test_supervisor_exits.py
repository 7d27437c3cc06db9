"""Every end of a worker leaves a line in the supervisor's log (issue 18: a node proxy
died mid-burst and its log just stopped): how it ended (its exit code, or the name of the
signal that killed it, SIGKILL being the OOM killer's) and what the supervisor does next.
The real supervisor and worker processes, in a network namespace of the test's own."""
from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from shoal.config import ClusterLayout

pytestmark = pytest.mark.timeout(180)


class LogTail:
    """A process's stderr, line by line, as it comes."""

    def __init__(self, stream):
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line) for line in stream], daemon=True).start()

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            if found := re.search(pattern, line):
                return found
        raise AssertionError(f"no line matching {pattern!r} in:\n" + "".join(self.seen[-40:]))


@pytest.fixture
def netns():
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a network namespace")
    name = f"shoal-t{os.getpid()}-{uuid.uuid4().hex[:4]}-sup"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_a_worker_killed_by_a_signal_is_named_so_and_restarted_and_a_retiring_one_is_said_so(netns):
    cluster = f"shoal-test-{os.getpid()}-sup"
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "shoal.agent.ztunnel", "--node", "node-1",
         "--cluster", cluster, "--workers", "1", "--no-same-node-bypass", "--drain-grace", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "SHOAL_CONTROLLER": ""})
    log = LogTail(proc.stderr)
    try:
        first = int(log.wait_for(r"supervisor: worker 0 \(pid (\d+)\) serves").group(1))
        os.kill(first, signal.SIGKILL)
        log.wait_for(rf"ERROR .*supervisor: worker 0 \(pid {first}\) was killed by SIGKILL after \d+ s; "
                     r"its \d+ live connections are lost; restarting it in [\d.]+ s")
        second = int(log.wait_for(r"supervisor: worker 0 \(pid (\d+)\) serves").group(1))
        assert second != first
        proc.send_signal(signal.SIGTERM)
        log.wait_for(r"SIGTERM \(pid \d+\): retiring")
        log.wait_for(rf"supervisor: worker 0 \(pid {second}\) exited with code 0; retiring, not restarted")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)   # its own session: the supervisor and its workers
            proc.wait(10)
        shutil.rmtree(ClusterLayout(name=cluster).run_dir, ignore_errors=True)
