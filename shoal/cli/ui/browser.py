"""Debian's Chromium driven by Playwright, for the UI's tests and benchmark.

Never a browser Playwright downloads itself: scripts/install.sh installs ``chromium``
from apt and the ``playwright`` package with its browser download disabled.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


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
