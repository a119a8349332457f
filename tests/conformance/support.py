"""Helpers shared by the conformance tests."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from llm_queue_dispatcher import LLMRequest, Priority, TokenInfo

R = TypeVar("R")


def run(coro: Coroutine[Any, Any, R]) -> R:
    """Drives a storage coroutine to completion without an event loop, asserting it never
    suspends (the in-memory contract: no awaiting, no threads, for any operation)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("the storage operation suspended")


def req(rid: str, priority: int = Priority.NORMAL, tokens: int = 10, **kw: Any) -> LLMRequest[str]:
    return LLMRequest(
        id=rid, payload=f"payload-{rid}", priority=Priority(priority), token_info=TokenInfo(tokens), **kw
    )
