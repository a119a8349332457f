"""The README's application example (``{.norun}`` there: it needs a provider) runs here as
written, against the local fake provider, through aiohttp's test client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.markdown_examples import parse_blocks
from tests.provider.server import ProviderServer

README = Path(__file__).resolve().parents[2] / "README.md"


def application_example() -> str:
    [block] = [
        b for b in parse_blocks(README.read_text(encoding="utf-8")) if b.heading == "Inside an application"
    ]
    return block.code


async def test_the_readme_application_answers_through_the_queued_client(
    openai_provider: ProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", openai_provider.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(application_example(), str(README), "exec"), namespace)
    async with TestClient(TestServer(namespace["app"])) as http:
        pro = await http.get("/ask", params={"q": "hello"}, headers={"x-plan": "pro", "x-user": "ada"})
        free = await http.get("/ask", params={"q": "bonjour"}, headers={"x-user": "bob"})
        assert (await pro.json(), await free.json()) == (
            {"answer": "echo: hello"},
            {"answer": "echo: bonjour"},
        )
    assert openai_provider.successes == {"hello": 1, "bonjour": 1}
    await namespace["client"]._dispatcher.close()
    await namespace["client"].close()  # the wrapped AsyncOpenAI's own close
