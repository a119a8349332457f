"""Fixtures: the local fake providers (started and stopped per test), alone or as the provider of
each pairing of provider and file format."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.provider.anthropic_server import AnthropicServer
from tests.provider.server import ProviderServer

from .support import CASES, Case, Fake, case_id


@pytest.fixture
def provider() -> Iterator[ProviderServer]:
    server = ProviderServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def anthropic_server() -> Iterator[AnthropicServer]:
    server = AnthropicServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def openai_fake(provider: ProviderServer) -> Fake:
    return Fake("openai", provider)


@pytest.fixture
def anthropic_fake(anthropic_server: AnthropicServer) -> Fake:
    return Fake("anthropic", anthropic_server)


@pytest.fixture(params=CASES, ids=case_id)
def case(request: pytest.FixtureRequest) -> Case:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def fake(case: Case) -> Iterator[Fake]:
    """The fake provider of ``case``."""
    server = (ProviderServer if case.provider == "openai" else AnthropicServer)().start()
    try:
        yield Fake(case.provider, server)
    finally:
        server.stop()
