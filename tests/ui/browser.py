"""Debian's Chromium driven by Playwright (never a browser Playwright downloads itself)."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def require_chromium() -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing: scripts/install.sh installs Debian's chromium")
    pytest.importorskip("playwright.sync_api", reason="scripts/install.sh installs playwright")


@contextlib.contextmanager
def chromium_page(width: int = 1400, height: int = 900):
    """A page in a fresh profile; console errors and dialogs are collected on the page."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="shoal-ui-chromium-")
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
                viewport={"width": width, "height": height})
            try:
                page = context.new_page()
                page.dialogs = []
                page.console_errors = []
                page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
                page.on("console", lambda msg: msg.type == "error" and page.console_errors.append(msg.text))
                yield page
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path
