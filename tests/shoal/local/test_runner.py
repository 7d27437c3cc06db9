"""The local cluster's process monitor: a component that ends, however it ends, leaves a
line in its log saying which process it was and how it ended (real processes)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shoal.local.runner import ended_line

pytestmark = pytest.mark.timeout(60)

COMPONENT = "import sys, time; print('serving', flush=True); time.sleep(60)"


def test_the_line_names_the_process_and_how_it_ended():
    killed = ended_line("proxy-node-1", 4242, -signal.SIGKILL, 12.3)
    assert " ERROR shoal.local.runner proxy-node-1 (pid 4242) was killed by SIGKILL after 12 s (exit code 137, " \
        in killed
    assert "OOM killer" in killed and killed.endswith(")\n")
    assert " ERROR shoal.local.runner agent-node-2 (pid 7) exited with code 3 after 0 s\n" in ended_line(
        "agent-node-2", 7, 3, 0.2)
    assert " INFO shoal.local.runner controller (pid 7) exited with code 0 " in ended_line("controller", 7, 0, 1)


def start_monitored(tmp_path: Path, script: str) -> tuple[subprocess.Popen, int, Path]:
    """The monitor running ``script`` as component ``proxy-node-1``: (monitor, component pid, log)."""
    log = tmp_path / "proxy-node-1.log"
    monitor = subprocess.Popen([sys.executable, "-m", "shoal.local.runner", "proxy-node-1", str(log), "--",
                                sys.executable, "-c", script], stdout=subprocess.PIPE, start_new_session=True)
    assert monitor.stdout is not None
    pid = int(monitor.stdout.readline())
    monitor.stdout.close()
    deadline = time.monotonic() + 20
    while "serving" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline and monitor.poll() is None, "the component never served"
        time.sleep(0.05)
    return monitor, pid, log


@pytest.fixture
def monitors():
    """Monitors a test started; killed (and their components) if the test did not end them."""
    started: list[tuple[subprocess.Popen, int]] = []
    yield started
    for monitor, pid in started:
        for target in (pid, monitor.pid):
            try:
                os.kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass
        monitor.wait(10)


def test_a_sigkilled_component_leaves_a_line_of_its_monitor(tmp_path, monitors):
    monitor, pid, log = start_monitored(tmp_path, COMPONENT)
    monitors.append((monitor, pid))
    assert pid != monitor.pid   # the component is a process of its own, not the monitor
    os.kill(pid, signal.SIGKILL)
    assert monitor.wait(20) == 137   # what a container runtime reports
    lines = log.read_text().splitlines()
    assert lines[0] == "serving"   # the component's own output, then the monitor's line
    assert f"proxy-node-1 (pid {pid}) was killed by SIGKILL after " in lines[-1], lines
    assert "(exit code 137, " in lines[-1], lines


def test_an_exit_code_is_reported_and_passed_on(tmp_path, monitors):
    monitor, pid, log = start_monitored(tmp_path, "import sys; print('serving', flush=True); sys.exit(3)")
    monitors.append((monitor, pid))
    assert monitor.wait(20) == 3
    assert f"proxy-node-1 (pid {pid}) exited with code 3 after " in log.read_text().splitlines()[-1]


def test_a_stop_of_the_whole_cluster_still_leaves_the_line(tmp_path, monitors):
    """``shoal down`` sends SIGTERM to every process of the cluster, monitors included: the
    monitor outlives its component to say how it ended."""
    monitor, pid, log = start_monitored(tmp_path, COMPONENT)
    monitors.append((monitor, pid))
    os.kill(monitor.pid, signal.SIGTERM)
    os.kill(pid, signal.SIGTERM)
    assert monitor.wait(20) == 143
    last = log.read_text().splitlines()[-1]
    assert f"proxy-node-1 (pid {pid}) was killed by SIGTERM after " in last and "(exit code 143, " in last


def test_a_command_that_cannot_start_is_the_monitors_error_not_a_silent_end(tmp_path):
    log = tmp_path / "agent-node-1.log"
    done = subprocess.run([sys.executable, "-m", "shoal.local.runner", "agent-node-1", str(log), "--",
                           str(tmp_path / "no-such-program")], capture_output=True, timeout=30)
    assert done.returncode != 0 and done.stdout == b""   # no pid reported: the caller raises
    assert b"no-such-program" in done.stderr
    usage = subprocess.run([sys.executable, "-m", "shoal.local.runner", "x"], capture_output=True, timeout=30)
    assert usage.returncode == 2 and b"usage:" in usage.stderr
