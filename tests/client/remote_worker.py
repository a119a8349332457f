"""Another process handling submitted requests over Redis: ``python -m tests.client.remote_worker
'<json options>'`` runs a `Worker` on the queue until the stop file appears (or 60 s pass), then
writes the ids it handled, one a line, to ``handled``.

Options: ``url``, ``queue``, ``handled`` (a path), ``stop`` (a path), ``concurrency``. A request
whose id starts with ``bad`` raises `PermanentError`; one starting with ``set`` returns a value
JSON cannot hold; any other returns ``{"echo": id, "pid": ...}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from llm_queue_dispatcher import (
    HandlerResult,
    LLMQueueDispatcher,
    LLMThrottle,
    PermanentError,
    ProcessableMessage,
    Worker,
)
from llm_queue_dispatcher.redis import RedisStorage


async def main(options: dict[str, Any]) -> None:
    storage: RedisStorage[Any] = RedisStorage(options["url"], options["queue"])
    dispatcher = LLMQueueDispatcher(storage)
    handled: list[str] = []

    async def handle(job: ProcessableMessage[Any]) -> HandlerResult[Any]:
        request_id = job.message.payload.id
        handled.append(request_id)
        await asyncio.sleep(0.001)
        if request_id.startswith("bad"):
            raise PermanentError(f"refused {request_id}")
        if request_id.startswith("set"):
            return HandlerResult({1, 2})
        return HandlerResult({"echo": request_id, "pid": os.getpid()}, actual_tokens=5)

    worker = Worker(
        dispatcher, LLMThrottle(100_000, 10_000_000), handle, concurrency=options.get("concurrency", 8)
    )
    running = asyncio.create_task(worker.run())
    stop, deadline = Path(options["stop"]), time.monotonic() + 60
    Path(options["ready"]).write_text("ready")  # noqa: ASYNC240 (one tiny write)
    while not stop.exists() and time.monotonic() < deadline:  # noqa: ASYNC110, ASYNC240 (a file from the test)
        await asyncio.sleep(0.02)
    worker.stop()
    await running
    await dispatcher.close()
    await storage.aclose()
    Path(options["handled"]).write_text("".join(f"{i}\n" for i in handled))  # noqa: ASYNC240 (at the end)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
