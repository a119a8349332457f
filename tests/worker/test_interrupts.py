"""Worker: what a handler raises beyond `Exception`. `BaseException` subclasses, `GeneratorExit`
and a `CancelledError` the handler raised itself are failures, backed off like any other;
`KeyboardInterrupt` and `SystemExit` stop the worker gracefully, then `run` raises them."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

from llm_queue_dispatcher import LLMThrottle, ManualClock, ProcessableMessage, Worker, create_in_memory_queue
from tests.worker.support import fill


class HandlerAbort(BaseException):
    """A `BaseException` subclass of the handler's own, like trio's or gevent's."""


@pytest.mark.parametrize(
    "make_error",
    [asyncio.CancelledError, GeneratorExit, HandlerAbort],
    ids=["own CancelledError", "GeneratorExit", "BaseException subclass"],
)
async def test_a_handler_raising_a_base_exception_is_backed_off_not_retried_at_once(
    make_error: Callable[[], BaseException],
) -> None:
    # A frozen clock: a message handed back with any delay stays invisible until it moves.
    clock = ManualClock(1_000.0)
    dispatcher = create_in_memory_queue(clock=clock)
    await fill(dispatcher, 1)
    attempts: list[int] = []
    called = asyncio.Event()

    async def handle(job: ProcessableMessage[Any]) -> int:
        attempts.append(job.message.attributes.receive_count)
        called.set()
        raise make_error()

    worker = Worker(
        dispatcher,
        LLMThrottle(60_000, 1e8, clock=clock),
        handle,
        retry_base_delay=2.0,
        max_retry_delay=2.0,
        rng=random.Random(3),
    )
    run = asyncio.ensure_future(worker.run())
    await asyncio.wait_for(called.wait(), 5)
    for _ in range(200):  # many turns of the loop: a hot loop would call it again and again
        await asyncio.sleep(0)
    assert attempts == [1]
    assert worker.running
    assert worker.stats.retried == 1
    # Once the backoff (at most 2 s, the cap) has passed, the next attempt comes.
    called.clear()
    clock.advance(2.0)
    await asyncio.wait_for(called.wait(), 5)
    assert attempts == [1, 2]
    worker.stop()
    stats = await asyncio.wait_for(run, 5)
    assert stats.released == 0


_INTERRUPT_SCRIPT = """
import asyncio, sys
from llm_queue_dispatcher import LLMRequest, LLMThrottle, TokenInfo, Worker, create_in_memory_queue

RAISE = {"KeyboardInterrupt": KeyboardInterrupt(), "SystemExit": SystemExit(3)}[sys.argv[1]]

async def main():
    dispatcher = create_in_memory_queue(visibility_timeout=600.0)
    for n in range(4):
        await dispatcher.enqueue(LLMRequest(f"r{n}", n, token_info=TokenInfo(10)))
    limiter = LLMThrottle(6000, 1e6)
    slow_started = asyncio.Event()
    async def handle(job):
        if job.message.payload.id == "r0":
            slow_started.set()
            await asyncio.sleep(0.3)  # within the grace: finishes
            return 1
        await slow_started.wait()
        raise RAISE
    worker = Worker(dispatcher, limiter, handle, concurrency=2, shutdown_grace=10.0)
    try:
        await worker.run()
    except BaseException as error:
        queue = (await dispatcher.get_queue_metrics()).queue
        stats = worker.stats
        tokens = limiter.get_metrics().consumption_history.total_tokens
        print(type(error).__name__, stats.processed, stats.released, queue.approximate_number_of_messages,
              queue.approximate_number_of_messages_in_flight, tokens, flush=True)
        raise
    print("run returned", flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize(("name", "status"), [("KeyboardInterrupt", -2), ("SystemExit", 3)])
def test_keyboard_interrupt_or_system_exit_in_a_handler_stops_gracefully_then_propagates(
    name: str, status: int
) -> None:
    # In a child process: the exception ends the program, as it should.
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_INTERRUPT_SCRIPT), name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # r0 finished within the grace; r1 (whose handler raised) released at once; r2 and r3 never
    # taken; nothing in flight; only r0's token kept by the limiter. Then run() raised it.
    assert result.stdout.split() == [name, "1", "1", "3", "0", "1"], result.stderr
    assert result.returncode == status, result.stderr


_ONCE_SCRIPT = """
import asyncio, sys
from llm_queue_dispatcher import LLMRequest, LLMThrottle, TokenInfo, Worker, create_in_memory_queue

RAISE = {"KeyboardInterrupt": KeyboardInterrupt, "SystemExit": SystemExit}[sys.argv[1]]

async def main():
    dispatcher = create_in_memory_queue(visibility_timeout=600.0)
    await dispatcher.enqueue(LLMRequest("r0", 0, token_info=TokenInfo(10)))
    calls = []
    async def handle(job):
        calls.append(job.message.attributes.receive_count)
        raise RAISE()
    # A second slot: a dequeue is waiting for work when the message is handed back.
    worker = Worker(dispatcher, LLMThrottle(6000, 1e6), handle, concurrency=2)
    try:
        await worker.run()
    except RAISE:
        queue = (await dispatcher.get_queue_metrics()).queue
        print(len(calls), queue.approximate_number_of_messages,
              queue.approximate_number_of_messages_in_flight)

asyncio.run(main())
"""


@pytest.mark.parametrize("name", ["KeyboardInterrupt", "SystemExit"])
def test_the_message_of_a_handler_raising_keyboard_interrupt_is_not_handled_again_before_the_stop(
    name: str,
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_ONCE_SCRIPT), name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # The handler ran once; its message is back in the queue, visible, for the next run.
    assert result.stdout.split() == ["1", "1", "0"], result.stderr
