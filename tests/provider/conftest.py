"""Fixtures: a local OpenAI-compatible server (started and stopped per test) and an SDK client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from openai import AsyncOpenAI

from .server import ProviderServer


@pytest.fixture
def provider() -> Iterator[ProviderServer]:
    server = ProviderServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def client(provider: ProviderServer) -> AsyncIterator[AsyncOpenAI]:
    sdk = AsyncOpenAI(base_url=provider.base_url, api_key="test-key", timeout=10.0)
    try:
        yield sdk
    finally:
        await sdk.close()
