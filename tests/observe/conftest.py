import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "agent" / "hubble"))


@pytest.fixture
def sockdir():
    path = Path(tempfile.mkdtemp(prefix="shoal-obs-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
