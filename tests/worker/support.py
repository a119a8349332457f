"""Helpers shared by the Worker tests: a queue filled with equal requests, a roomy limiter and a
handler that does nothing."""

from __future__ import annotations

from typing import Any

from llm_queue_dispatcher import LLMQueueDispatcher, LLMRequest, LLMThrottle, ProcessableMessage, TokenInfo


async def fill(dispatcher: LLMQueueDispatcher[Any], count: int, tokens: int = 100) -> list[str]:
    ids = [f"r{n}" for n in range(count)]
    for request_id in ids:
        await dispatcher.enqueue(LLMRequest(request_id, {"n": request_id}, token_info=TokenInfo(tokens)))
    return ids


def roomy_limiter() -> LLMThrottle:
    return LLMThrottle(60_000, 100_000_000)


async def noop(job: ProcessableMessage[Any]) -> int | None:
    return None
