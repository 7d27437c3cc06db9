import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@pytest.fixture
def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces")


@dataclass
class FakeContext:
    """A scenario's Context without a bed: --quick durations, progress lines kept."""

    repetitions: int = 2
    quick: bool = True
    workdir: Path = Path("/nonexistent")
    lines: list[str] = field(default_factory=list)

    def seconds(self, full, quick):
        return quick

    def log(self, message):
        self.lines.append(message)


@pytest.fixture
def fake_context() -> type[FakeContext]:
    """Make a FakeContext (call it, optionally with ``repetitions=``)."""
    return FakeContext
