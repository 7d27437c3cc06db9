"""Browser test helpers: skip without Chromium/Playwright, keep screenshots as artifacts."""
from __future__ import annotations

from pathlib import Path

import pytest

from shoal.cli.ui.browser import CHROMIUM, chromium_page  # noqa: F401 (re-exported for the tests)

ARTIFACTS = Path(__file__).resolve().parents[3] / "artifacts"


def require_chromium() -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing: scripts/install.sh installs Debian's chromium")
    pytest.importorskip("playwright.sync_api", reason="scripts/install.sh installs playwright")


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path
