"""Debian's chromium driven by Playwright, the way the demo's browser test and screenshot use it.

Never ``playwright install``: the browser is ``/usr/bin/chromium`` from the distribution, started
headless with a fresh profile and with its background network features off, so nothing is
downloaded and the page can reach nothing but the demo server.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Where the browser test leaves its screenshot (gitignored; CI keeps it as an artefact).
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


@contextlib.contextmanager
def chromium_page(width: int = 1500, height: int = 1100) -> Iterator[Any]:
    """A Playwright page in a fresh headless chromium; closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="llmqd-chromium-") as profile:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height},
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()
