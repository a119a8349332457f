"""Makes docs/demo.png, the README's picture of ``llmqd demo``. From the repository root::

    .venv/bin/python docs/screenshot.py            # about 45 s; needs /usr/bin/chromium

Runs the demo at 6x speed with its defaults (every strategy the page has, one column each),
injects a burst of 500 requests after 15 s (90 simulated seconds) through the page's own form,
lets it run to 38 s (about 230 simulated seconds), clicks the newest completed request of the
``default`` column, and saves the whole page (with reduced motion, so no chip is caught halfway
through its fade-in).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.browser import chromium_page  # noqa: E402  (after the path change above)
from tests.demo_process import start_demo  # noqa: E402


def main() -> int:
    output = ROOT / "docs" / "demo.png"
    with start_demo("--speed", "6") as demo, chromium_page(width=1600, height=1200) as page:
        page.emulate_media(reduced_motion="reduce")  # no chip caught fading in
        page.goto(demo.url)
        page.wait_for_selector("#connection.up", timeout=10_000)
        started = time.monotonic()
        time.sleep(15)
        page.fill("#burst-size", "500")
        page.click("#inject")
        page.wait_for_selector("#control-status.ok", timeout=5_000)
        time.sleep(max(0.0, 38 - (time.monotonic() - started)))
        page.locator('.lane[data-lane="default"] .completed .chip').first.click()
        page.wait_for_selector("#detail .breakdown", timeout=5_000)
        page.mouse.move(0, 0)  # let the column the click froze move on
        time.sleep(0.3)
        page.screenshot(path=str(output), full_page=True)
    print(f"wrote {output.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
