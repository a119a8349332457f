"""The demo page in a real browser: Debian's chromium driven by Playwright against ``llmqd demo``.

Skipped only where /usr/bin/chromium is not installed (``.ci/run`` installs it); with chromium
present every check here must pass. Leaves ``artifacts/demo-browser.png`` (the page after the
checks) and ``artifacts/demo-browser.json`` (the responsiveness figures).
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser import ARTIFACTS, CHROMIUM, chromium_page
from tests.demo_process import DemoProcess, start_demo

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is not installed (.ci/run installs it)", allow_module_level=True)

from playwright.sync_api import Page

from llm_queue_dispatcher.demo.engine import DEFAULT_STRATEGIES as STRATEGIES


@pytest.fixture(scope="module")
def demo() -> Iterator[DemoProcess]:
    with start_demo("--speed", "4") as process:
        yield process


@pytest.fixture(scope="module")
def page(demo: DemoProcess) -> Iterator[tuple[Page, list[str], list[str]]]:
    """The page, the console errors it logged and the URLs it requested, all since it loaded."""
    errors: list[str] = []
    requested: list[str] = []
    with chromium_page() as browser_page:
        browser_page.on(
            "console", lambda message: errors.append(message.text) if message.type == "error" else None
        )
        browser_page.on("pageerror", lambda error: errors.append(str(error)))
        browser_page.on("requestfailed", lambda request: errors.append(f"failed: {request.url}"))
        browser_page.on("request", lambda request: requested.append(request.url))
        browser_page.goto(demo.url)
        yield browser_page, errors, requested
        ARTIFACTS.mkdir(exist_ok=True)
        browser_page.screenshot(path=str(ARTIFACTS / "demo-browser.png"), full_page=True)


def _metric(demo: DemoProcess, name: str, strategy: str) -> float:
    with urllib.request.urlopen(demo.url + "metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f'{name}{{strategy="{strategy}"}} '):
                return float(line.split()[-1])
    raise AssertionError(f"{name} for {strategy} not in /metrics")


def _total(page: Page, lane: str, section: str) -> int:
    text = page.get_attribute(f'.lane[data-lane="{lane}"] .{section} .count', "data-total")
    return int(text or 0)


def test_the_page_loads_without_errors_and_shows_every_strategy(
    demo: DemoProcess, page: tuple[Page, list[str], list[str]]
) -> None:
    browser_page, errors, requested = page
    browser_page.wait_for_selector("#connection.up", timeout=10_000)
    # The columns and charts are built from the first event, which follows the connection.
    browser_page.wait_for_function("document.querySelectorAll('#charts .uplot').length === 4", timeout=10_000)
    lanes = browser_page.locator(".lane")
    assert lanes.count() == len(STRATEGIES)
    assert [lanes.nth(i).get_attribute("data-lane") for i in range(lanes.count())] == list(STRATEGIES)
    assert browser_page.locator("#charts .uplot").count() == 4
    assert errors == []
    outside = [url for url in requested if not url.startswith((demo.url, "data:"))]
    assert outside == []


def test_requests_appear_and_complete(page: tuple[Page, list[str], list[str]]) -> None:
    browser_page, errors, _ = page
    for lane in STRATEGIES:
        browser_page.wait_for_function(
            f"""() => Number(document.querySelector('.lane[data-lane="{lane}"] .completed .count')
                     ?.dataset.total) > 5""",
            timeout=20_000,
        )
        assert browser_page.locator(f'.lane[data-lane="{lane}"] .completed .chip').count() > 0
        assert browser_page.locator(f'.lane[data-lane="{lane}"] .pending .chip').count() > 0
    assert errors == []


def test_the_tpm_control_changes_every_limiter(
    demo: DemoProcess, page: tuple[Page, list[str], list[str]]
) -> None:
    browser_page, errors, _ = page
    browser_page.fill("#tpm", "77777")
    browser_page.click("#apply")
    browser_page.wait_for_selector("#control-status.ok", timeout=5_000)
    for lane in STRATEGIES:
        assert _metric(demo, "llmqd_limiter_capacity_tokens", lane) == 77_777
    # A bad value is named and changes nothing.
    browser_page.fill("#tpm", "-5")
    browser_page.click("#apply")
    browser_page.wait_for_selector("#control-status.error", timeout=5_000)
    assert "tpm" in browser_page.inner_text("#control-status")
    assert _metric(demo, "llmqd_limiter_capacity_tokens", "default") == 77_777
    browser_page.fill("#tpm", "77777")
    # The browser logs the refused post (HTTP 400) to the console; nothing else may appear.
    assert [message for message in errors if "status of 400" not in message] == []
    errors.clear()


def _click_a_completed_request(browser_page: Page, lane: str) -> float:
    """Clicks the newest completed request of ``lane``; returns the seconds until its breakdown
    shows. (The list moves while the test looks at it, so any completed chip will do.)"""
    browser_page.evaluate("document.querySelector('#detail').innerHTML = ''")
    started = time.perf_counter()
    browser_page.locator(f'.lane[data-lane="{lane}"] .completed .chip').first.click()
    browser_page.wait_for_selector("#detail .breakdown", timeout=5_000)
    elapsed = time.perf_counter() - started
    facts = dict(
        zip(
            browser_page.locator("#detail dt").all_inner_texts(),
            browser_page.locator("#detail dd").all_inner_texts(),
            strict=True,
        )
    )
    assert facts["strategy"] == lane
    # Its state now: settled, or in flight again after a failed attempt.
    assert facts["state"] in {"completed", "failed, retried", "processing"}
    return elapsed


def test_a_click_shows_the_score_breakdown_and_reason(page: tuple[Page, list[str], list[str]]) -> None:
    browser_page, errors, _ = page
    _click_a_completed_request(browser_page, "default")
    detail = browser_page.locator("#detail")
    assert detail.locator("h2").inner_text().startswith("r")
    names = detail.locator(".breakdown td.name").all_inner_texts()
    assert names == ["priority", "efficiency", "wait_time", "retry", "token_fit", "processing_time"]
    total = float(detail.locator("h3").inner_text().removeprefix("Score "))
    parts = [float(value) for value in detail.locator(".breakdown td.value").all_inner_texts()]
    assert total == pytest.approx(sum(parts), abs=0.004)
    assert detail.locator(".reason").inner_text().startswith(f"score {total:.3f}")
    # A waiting request has no score yet: the panel says so and shows what is known.
    browser_page.locator('.lane[data-lane="fair"] .pending .chip').first.click()
    browser_page.wait_for_function("document.querySelector('#detail .breakdown') === null")
    assert "Waiting" in detail.inner_text()
    assert "fair" in detail.locator("dd").all_inner_texts()
    # The wait chart follows the chosen column.
    browser_page.select_option("#wait-lane", label="throughput")
    assert errors == []


def test_the_page_stays_responsive_with_10000_queued(page: tuple[Page, list[str], list[str]]) -> None:
    browser_page, errors, _ = page
    browser_page.fill("#burst-size", "10000")
    browser_page.click("#inject")
    browser_page.wait_for_selector("#control-status.ok", timeout=10_000)
    browser_page.wait_for_function(
        """() => [...document.querySelectorAll('.pending .count')]
                 .every((node) => Number(node.dataset.total) >= 10000)""",
        timeout=10_000,
    )
    figures: dict[str, Any] = {}
    # The page shows counts and heads: the DOM stays small whatever the depth.
    figures["dom_elements"] = browser_page.evaluate("document.getElementsByTagName('*').length")
    figures["chips"] = browser_page.locator(".chip").count()
    assert figures["dom_elements"] < 2_000
    assert figures["chips"] <= len(STRATEGIES) * 3 * 12
    # Clicks still answer: a click on a completed request shows its breakdown quickly.
    clicks = [
        _click_a_completed_request(browser_page, lane) for lane in ("fair", "throughput", "simple_priority")
    ]
    figures["click_to_breakdown_s"] = [round(seconds, 3) for seconds in clicks]
    # The main thread keeps up: two animation frames come promptly.
    frames = browser_page.evaluate(
        """async () => { const t0 = performance.now();
             await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
             return performance.now() - t0; }"""
    )
    figures["two_frames_ms"] = round(frames, 1)
    assert max(clicks) < 2.0
    assert frames < 500
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "demo-browser.json").write_text(json.dumps(figures, indent=2))
    assert errors == []
