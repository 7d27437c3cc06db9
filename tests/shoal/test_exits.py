"""How a process ended, in words and as a container's exit code."""
from __future__ import annotations

import signal

from shoal.exits import container_exit_code, exit_description


def test_an_exit_is_described_by_its_code_or_its_signals_name():
    assert exit_description(0) == "exited with code 0"
    assert exit_description(3) == "exited with code 3"
    assert exit_description(-signal.SIGKILL) == "was killed by SIGKILL"
    assert exit_description(-signal.SIGABRT) == "was killed by SIGABRT"
    assert exit_description(-200) == "was killed by signal 200"


def test_a_signal_is_128_plus_its_number_as_a_container_runtime_reports_it():
    assert container_exit_code(0) == 0 and container_exit_code(3) == 3
    assert container_exit_code(-signal.SIGKILL) == 137 and container_exit_code(-signal.SIGTERM) == 143
