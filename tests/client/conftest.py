"""Fixtures of the drop-in client tests: the Redis server of the Redis tests, the fake providers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI

from tests.provider.anthropic_server import AnthropicServer
from tests.provider.server import ProviderServer
from tests.redis.conftest import redis_url, shared_server

__all__ = ["redis_url", "shared_server"]


@pytest.fixture
def openai_provider() -> Iterator[ProviderServer]:
    server = ProviderServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def openai_client(openai_provider: ProviderServer) -> AsyncIterator[AsyncOpenAI]:
    sdk = AsyncOpenAI(base_url=openai_provider.base_url, api_key="test-key", timeout=10.0)
    try:
        yield sdk
    finally:
        await sdk.close()


@pytest.fixture
def anthropic_provider() -> Iterator[AnthropicServer]:
    server = AnthropicServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def anthropic_client(anthropic_provider: AnthropicServer) -> AsyncIterator[AsyncAnthropic]:
    sdk = AsyncAnthropic(base_url=anthropic_provider.base_url, api_key="test-key", timeout=10.0)
    try:
        yield sdk
    finally:
        await sdk.close()
