"""The demo's web app over HTTP (aiohttp's test server on 127.0.0.1), without a browser."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from llm_queue_dispatcher.demo.engine import Controls, DemoEngine
from llm_queue_dispatcher.demo.server import SERVER_KEY, create_app


@pytest.fixture
async def client() -> AsyncIterator[TestClient[Any, Any]]:
    engine = DemoEngine(["default", "fair"], speed=50.0, controls=Controls(failure_rate=0.0))
    await engine.burst(60)
    app = create_app(engine, push_interval=0.05)
    async with TestClient(TestServer(app, host="127.0.0.1")) as test_client:
        yield test_client


async def _events(client: TestClient[Any, Any], count: int) -> list[tuple[str, dict[str, Any]]]:
    """The first ``count`` server-sent events of a fresh connection."""
    out: list[tuple[str, dict[str, Any]]] = []
    async with client.get("/events") as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        event = ""
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                out.append((event, json.loads(line[len("data: ") :])))
                if len(out) == count:
                    break
    return out


def _metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"{name} {labels} not in /metrics")


async def test_the_page_and_its_files_come_from_this_server_only(client: TestClient[Any, Any]) -> None:
    page = await client.get("/")
    assert page.status == 200
    html = await page.text()
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert "/static/app.js" in assets
    assert "/static/vendor/uplot/uPlot.iife.min.js" in assets
    for asset in assets:
        # Nothing from the network: local paths (and the empty data: favicon) only.
        assert asset.startswith(("/", "data:")), asset
        if asset.startswith("/static/"):
            response = await client.get(asset)
            assert response.status == 200, asset
    script = await (await client.get("/static/app.js")).text()
    assert "http://" not in script
    assert "https://" not in script
    assert (await client.get("/static/../__init__.py")).status == 404


async def test_events_say_hello_then_push_snapshots(client: TestClient[Any, Any]) -> None:
    events = await _events(client, 3)
    (first, hello), (second, snapshot), _ = events
    assert first == "hello"
    assert [s["name"] for s in hello["strategies"]] == ["default", "fair"]
    assert hello["controls"]["tpm"] == 60_000
    assert second == "snapshot"
    assert [lane["name"] for lane in snapshot["lanes"]] == ["default", "fair"]
    assert snapshot["point"]["t"] == snapshot["t"]
    assert set(snapshot["lanes"][0]) >= {"pending", "processing", "completed", "stats"}


async def test_a_tpm_change_reaches_the_limiter_and_metrics(client: TestClient[Any, Any]) -> None:
    response = await client.post("/api/controls", json={"tpm": 123_456})
    assert response.status == 200
    assert (await response.json())["controls"]["tpm"] == 123_456
    metrics = await (await client.get("/metrics")).text()
    assert _metric(metrics, "llmqd_limiter_capacity_tokens", strategy="default") == 123_456
    assert _metric(metrics, "llmqd_limiter_capacity_tokens", strategy="fair") == 123_456
    names = {sample.name for family in text_string_to_metric_families(metrics) for sample in family.samples}
    assert names
    assert all(name.startswith("llmqd_") for name in names)
    assert "llmqd_dispatched_total" in names
    assert "llmqd_wait_time_seconds_bucket" in names


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"tpm": -1}, "tpm"),
        ({"rpm": None}, "rpm"),
        ({"tpm": 1e300}, "tpm"),
        ({"tenants": 99}, "tenants"),
        ({"priority_mix": [1, 2]}, "priority_mix"),
        ({"volume": 11}, "unknown control"),
        ([1, 2], "JSON object"),
    ],
)
async def test_bad_controls_get_400_and_change_nothing(
    client: TestClient[Any, Any], body: Any, message: str
) -> None:
    response = await client.post("/api/controls", json=body)
    assert response.status == 400
    assert message in (await response.json())["error"]
    metrics = await (await client.get("/metrics")).text()
    assert _metric(metrics, "llmqd_limiter_capacity_tokens", strategy="default") == 60_000


async def test_malformed_posts_are_refused(client: TestClient[Any, Any]) -> None:
    for body in ("{", "NaN]", ""):
        response = await client.post("/api/controls", data=body, headers={"Content-Type": "application/json"})
        assert response.status == 400
    # A JSON NaN parses but is not a finite number.
    response = await client.post(
        "/api/controls", data='{"tpm": NaN}', headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    assert "finite" in (await response.json())["error"]
    # Form posts (what another site could send without a CORS preflight) are refused.
    response = await client.post("/api/controls", data={"tpm": "1"})
    assert response.status == 415
    response = await client.post(
        "/api/burst", data="x" * 20_000, headers={"Content-Type": "application/json"}
    )
    assert response.status == 413


async def test_bursts(client: TestClient[Any, Any]) -> None:
    response = await client.post("/api/burst", json={"size": 25, "priority": "URGENT"})
    assert response.status == 200
    assert await response.json() == {"enqueued": 25}
    for body in ({"size": -3}, {"size": "many"}, {"size": 10, "priority": "SOON"}, {"size": 1, "extra": 1}):
        response = await client.post("/api/burst", json=body)
        assert response.status == 400, body
        assert "error" in await response.json()


async def test_request_details(client: TestClient[Any, Any]) -> None:
    snapshot: dict[str, Any] = {}
    for event, data in await _events(client, 40):
        if event == "snapshot" and data["lanes"][0]["completed"]["items"]:
            snapshot = data
            break
    assert snapshot, "nothing completed"
    chip = snapshot["lanes"][0]["completed"]["items"][0]
    response = await client.get(f"/api/requests/default/{chip['id']}")
    assert response.status == 200
    detail = await response.json()
    assert detail["id"] == chip["id"]
    assert set(detail["score"]["breakdown"]) >= {"priority", "wait_time", "token_fit"}
    assert detail["reason"].startswith("score ")
    assert (await client.get("/api/requests/default/nope")).status == 404


async def test_requests_for_another_host_name_are_refused(client: TestClient[Any, Any]) -> None:
    response = await client.get("/", headers={"Host": "attacker.example:8765"})
    assert response.status == 403


async def test_a_page_that_goes_away_ends_its_event_stream_without_a_traceback(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    # Pages that close their connection at once, with a reset, before or after the headers.
    port = client.port
    for wait_for_headers in (False, True, False, True):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        if wait_for_headers:
            await reader.readuntil(b"\r\n\r\n")
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
    # Each stream ends: the server forgets its subscriber.
    hub = client.app[SERVER_KEY].hub
    for _ in range(500):
        if not hub.subscribers:
            break
        await asyncio.sleep(0.01)
    assert not hub.subscribers
    assert [record for record in caplog.records if record.levelno >= logging.ERROR] == []
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[" * 5_000 + "]" * 5_000, "nested too deeply"),
        ('{"priority_mix": ' + "[" * 3_000 + "]" * 3_000 + "}", "nested too deeply"),
        ('{"tpm": ' + "9" * 4_000 + "}", "tpm must be"),
        ('{"tpm": ' + "9" * 5_000 + "}", "not valid JSON"),
        ('{"rpm": 1e999}', "rpm must be a finite number"),
        ('{"rpm": -1e999}', "rpm must be a finite number"),
        ('{"tpm": [60000]}', "tpm must be a finite number"),
        ('{"tenants": {"n": 3}}', "tenants must be an integer"),
        ('{"priority_mix": "1234"}', "priority_mix must be 4 numbers"),
        ('{"priority_mix": [1e308, 1e308, 1e308, 1e308]}', r"priority_mix\[0\] must be within"),
        ('"tpm"', "must be a JSON object"),
        ("\xff\xfe", "not valid JSON"),
    ],
)
async def test_hostile_bodies_get_a_short_400_and_no_traceback(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture, body: str, message: str
) -> None:
    for path in ("/api/controls", "/api/burst"):
        response = await client.post(
            path, data=body.encode("latin-1"), headers={"Content-Type": "application/json"}
        )
        assert response.status in (400, 413), (path, response.status)
        if response.status == 413:
            continue  # larger than the 16 KiB a body may have: refused before it is read
        error = (await response.json())["error"]
        assert len(error) < 200
        if path == "/api/controls" or "JSON" in message or "nested" in message:
            assert re.search(message, error), error
    assert [record for record in caplog.records if record.levelno >= logging.ERROR] == []
    metrics = await (await client.get("/metrics")).text()
    assert _metric(metrics, "llmqd_limiter_capacity_tokens", strategy="default") == 60_000


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"rpm": 0.5}, "rpm"),
        ({"tpm": 0.5}, "tpm"),
        ({"tpm": 15_000}, "tpm"),
        ({"rpm": 0, "tpm": 60_000}, "rpm"),
    ],
)
async def test_a_limit_that_could_never_admit_a_request_gets_a_400_naming_it(
    client: TestClient[Any, Any], body: dict[str, float], names: str
) -> None:
    response = await client.post("/api/controls", json=body)
    assert response.status == 400
    assert (await response.json())["error"].startswith(names)


@pytest.mark.parametrize(
    ("body", "message"),
    [({"size": 10**4000}, "size must be an integer"), ({"size": 5, "priority": "U" * 5_000}, "priority")],
)
async def test_hostile_bursts_get_a_short_400(
    client: TestClient[Any, Any], body: dict[str, Any], message: str
) -> None:
    response = await client.post(
        "/api/burst", data=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    error = (await response.json())["error"]
    assert error.startswith(message)
    assert len(error) < 200


async def test_the_page_says_what_the_charts_mean(client: TestClient[Any, Any]) -> None:
    html = await (await client.get("/")).text()
    tpm_note = re.search(r'<p class="note" id="note-tpm">(.*?)</p>', html, re.S)
    throughput_note = re.search(r'<p class="note" id="note-throughput">(.*?)</p>', html, re.S)
    assert tpm_note is not None
    assert throughput_note is not None
    # Above the TPM line: saved budget (the bucket starts full) and the estimation error.
    assert "starts full" in tpm_note.group(1)
    assert "not the limiter failing" in tpm_note.group(1)
    assert "estimation error" in tpm_note.group(1)
    # Why throughput drops after a burst.
    assert "Why throughput drops after a burst" in throughput_note.group(1)
    assert "TPM limit instead of the" in " ".join(throughput_note.group(1).split())
