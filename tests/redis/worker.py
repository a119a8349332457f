"""The processes of the fault tests: ``python -m tests.redis.worker MODE '<json options>'``.

Each writes its events to its own ledger (``tests/redis/ledger.py``) and stops by itself (a
deadline in every loop), so a test that fails never leaves it running for long; the tests also
kill its process group at teardown.

Modes: ``produce`` (enqueue ids, riding out a restarting server), ``consume`` (receive and delete
until the queue is empty), ``poison`` (like consume, but fail the ids named poisonous), ``hold``
(receive one message, then wait for a go file and try to use the handle), ``limiter`` (hammer a
shared `RedisThrottle` with a client clock skewed by ``skew`` seconds), ``dispatch`` (an
`LLMQueueDispatcher` over `RedisStorage`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from llm_queue_dispatcher import (
    DuplicateRequestError,
    LimiterUnavailableError,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    LLMThrottle,
    ReceiptHandleError,
    StorageError,
    TokenInfo,
)
from llm_queue_dispatcher.redis import RedisStorage, RedisThrottle
from tests.redis.ledger import Ledger

_real_time = time.time


async def _delete(storage: RedisStorage[Any], ledger: Ledger, rid: str, handle: str, deadline: float) -> None:
    """Deletes, retrying through a server outage; records whether Redis surely applied it."""
    uncertain = False
    ledger.write("deleting", id=rid, handle=handle)
    while _real_time() < deadline:
        try:
            await storage.delete_message(handle)
        except ReceiptHandleError:
            ledger.write("ack_unknown" if uncertain else "stale", id=rid, handle=handle)
            return
        except StorageError:
            uncertain = True  # the reply was lost: the delete may have been applied
            await asyncio.sleep(0.05)
            continue
        ledger.write("ack", id=rid, handle=handle)
        return
    ledger.write("ack_unknown" if uncertain else "gave_up", id=rid, handle=handle)


async def produce(options: dict[str, Any], ledger: Ledger) -> None:
    deadline = _real_time() + options["max_seconds"]
    async with RedisStorage(options["url"], options["queue"]) as storage:
        for rid in options["ids"]:
            retried = False
            while _real_time() < deadline:
                try:
                    await storage.enqueue(LLMRequest(rid, {"n": rid}, token_info=TokenInfo(10)))
                except DuplicateRequestError:
                    if not retried:
                        raise
                except StorageError:
                    retried = True  # stored or not: retry; a duplicate then means it was
                    await asyncio.sleep(0.05)
                    continue
                if retried:
                    # The failed attempt may have been stored and even processed already, in
                    # which case this one is a second copy: at-least-once, for the producer too.
                    ledger.write("enq_uncertain", id=rid)
                ledger.write("enq", id=rid)
                break
            await asyncio.sleep(options.get("pace", 0.0))


async def consume(options: dict[str, Any], ledger: Ledger) -> None:
    deadline = _real_time() + options["max_seconds"]
    poison = set(options.get("poison", ()))
    idle_since: float | None = None
    async with RedisStorage(
        options["url"], options["queue"], max_receive_count=options.get("max_receive_count"),
        dead_letter=options.get("dead_letter"),
    ) as storage:  # fmt: skip
        while _real_time() < deadline:
            try:
                batch = await storage.dequeue(options.get("batch", 5), options["visibility"])
            except StorageError:
                ledger.write("storage_error")
                await asyncio.sleep(0.05)
                continue
            if not batch:
                try:
                    attributes = await storage.get_queue_attributes()
                except StorageError:
                    await asyncio.sleep(0.05)
                    continue
                empty = (
                    attributes.approximate_number_of_messages
                    + attributes.approximate_number_of_messages_in_flight
                )
                if empty == 0 and options.get("exit_when_empty", True):
                    idle_since = idle_since or _real_time()
                    if _real_time() - idle_since > options.get("idle_seconds", 0.5):
                        return
                await asyncio.sleep(0.02)
                continue
            idle_since = None
            for message in batch:
                rid, handle = message.payload.id, message.attributes.receipt_handle
                ledger.write("recv", id=rid, handle=handle, count=message.attributes.receive_count)
            for message in batch:
                rid, handle = message.payload.id, message.attributes.receipt_handle
                await asyncio.sleep(options.get("work", 0.0))
                if rid in poison:
                    ledger.write("fail", id=rid, handle=handle)
                    with contextlib.suppress(ReceiptHandleError, StorageError):
                        await storage.update_visibility_timeout(handle, 0.0)
                    continue
                await _delete(storage, ledger, rid, handle, deadline)


async def hold(options: dict[str, Any], ledger: Ledger) -> None:
    go = Path(options["go_file"])
    async with RedisStorage(options["url"], options["queue"]) as storage:
        [message] = await storage.dequeue(1, options["visibility"])
        handle = message.attributes.receipt_handle
        ledger.write("recv", id=message.payload.id, handle=handle, count=message.attributes.receive_count)
        Path(options["ready_file"]).touch()  # noqa: ASYNC240 (one tiny write)
        deadline = _real_time() + options["max_seconds"]
        while not go.exists() and _real_time() < deadline:  # noqa: ASYNC110, ASYNC240 (a file from another process)
            await asyncio.sleep(0.01)
        for name, attempt in (
            ("visibility", lambda: storage.update_visibility_timeout(handle, 30.0)),
            ("delete", lambda: storage.delete_message(handle)),
        ):
            try:
                await attempt()
            except ReceiptHandleError:
                ledger.write("refused", id=message.payload.id, handle=handle, operation=name)
            else:
                ledger.write("ack" if name == "delete" else "extended", id=message.payload.id, handle=handle)


async def limiter(options: dict[str, Any], ledger: Ledger) -> None:
    # A host whose clock is `skew` seconds off: everything that asks Python for the time is told so.
    skew = options["skew"]
    real_monotonic = time.monotonic
    time.time = lambda: _real_time() + skew
    time.monotonic = lambda: real_monotonic() + skew
    deadline = _real_time() + options["seconds"]
    throttle = RedisThrottle(
        options["url"], options["name"], rpm=options["rpm"], tpm=options["tpm"],
        burst_rpm=options.get("burst_rpm"), burst_tpm=options.get("burst_tpm"),
    )  # fmt: skip
    async with throttle:
        i = 0
        while _real_time() < deadline:
            i += 1
            before = _real_time()
            try:
                granted = await throttle.consume(f"{os.getpid()}-{i}", options["tokens"])
            except LimiterUnavailableError:
                ledger.write("unavailable", before=before, after=_real_time())
                await asyncio.sleep(0.01)
                continue
            after = _real_time()
            if granted:
                ledger.write("grant", before=before, after=after, tokens=options["tokens"])
            else:
                await asyncio.sleep(0.002)


async def dispatch(options: dict[str, Any], ledger: Ledger) -> None:
    deadline = _real_time() + options["max_seconds"]
    config = LLMQueueDispatcherConfig(
        buffer_size=options["buffer_size"],
        visibility_timeout=options["visibility"],
        enable_prefetch=options.get("prefetch", False),
        prefetch_interval=options.get("prefetch_interval", 5.0),
    )
    shared = options.get("limiter")
    limiter: Any = (
        LLMThrottle(1e9, 1e12)
        if shared is None
        else RedisThrottle(options["url"], shared["name"], rpm=shared["rpm"], tpm=shared["tpm"])
    )
    async with RedisStorage(options["url"], options["queue"]) as storage:
        dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage, config)
        async with dispatcher:
            idle = 0
            while _real_time() < deadline:
                before = _real_time()
                job = await dispatcher.dequeue(limiter, timeout=0.2)
                after = _real_time()
                if job is None:
                    attributes = await storage.get_queue_attributes()  # a shared limiter may be the wait
                    if attributes.approximate_number_of_messages == 0 and (
                        attributes.approximate_number_of_messages_in_flight == 0 or idle > 10
                    ):
                        break
                    idle += 1
                    continue
                idle = 0
                rid, handle = job.message.payload.id, job.message.attributes.receipt_handle
                ledger.write(
                    "recv", id=rid, handle=handle, count=job.message.attributes.receive_count,
                    tokens=job.message.payload.token_info.estimated, before=before, after=after,
                )  # fmt: skip
                await asyncio.sleep(options.get("work", 0.0))
                await job.mark_as_processed()
                ledger.write("ack", id=rid, handle=handle)


async def global_choice(options: dict[str, Any], ledger: Ledger) -> None:
    """A `fair_priority` (or, with ``policy="score"``, score-policy) dispatcher whose choice runs
    in Redis (``redis/global_choice.py``): each hand-out and each mark is recorded with the
    server's instant of its script (``at``, us), so the test can replay every decision against
    the brute-force reference in server order. The payload is ``{"actual": n}``: the count the
    mark reports; with ``"fail": k`` the first k deliveries of it are marked failed (visible again
    at once, recorded as ``fail``). With ``hold_jobs`` it takes that many jobs, marks none and
    sleeps (to be killed)."""
    from llm_queue_dispatcher import FairPriorityConfig
    from llm_queue_dispatcher.redis import global_choice as module

    instants: list[int] = []
    original = module.GlobalChoice._run

    async def recorded(
        self: Any, name: str, limiter: Any, args: tuple[Any, ...], tail: tuple[Any, ...] = ()
    ) -> Any:
        reply = await original(self, name, limiter, args, tail)
        instants.append(int(reply[0]))  # the server's instant, first in both replies
        return reply

    module.GlobalChoice._run = recorded  # type: ignore[method-assign]
    deadline = _real_time() + options.get("max_seconds", 60)
    go = options.get("go")
    while go and not Path(go).exists() and _real_time() < deadline:  # noqa: ASYNC110, ASYNC240 (a file from another process)
        await asyncio.sleep(0.005)
    fair = FairPriorityConfig(
        tenant_weights=options.get("weights", {}), fairness_window=options.get("window", 60.0)
    )
    if options.get("policy") == "score":
        config = LLMQueueDispatcherConfig(
            visibility_timeout=options.get("visibility", 30.0),
            min_score_threshold=options.get("min_score", 0.1),
        )
    else:
        config = LLMQueueDispatcherConfig(
            policy="fair_priority", fair_priority=fair, visibility_timeout=options.get("visibility", 30.0)
        )
    storage: RedisStorage[Any] = RedisStorage(options["url"], options["queue"])
    limiter = RedisThrottle(options["url"], options["limiter"], rpm=options["rpm"], tpm=options["tpm"])
    hold_jobs = options.get("hold_jobs")
    taken = 0
    async with storage, limiter:
        dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage, config)
        assert dispatcher._global is not None
        idle = 0
        while _real_time() < deadline:
            job = await dispatcher.dequeue(limiter)
            if job is None:
                if hold_jobs is not None or idle > 200:
                    break
                attributes = await storage.get_queue_attributes()
                if attributes.approximate_number_of_messages == 0:
                    break
                idle += 1
                await asyncio.sleep(0.005)
                continue
            idle = 0
            request = job.message.payload
            ledger.write(
                "recv", id=request.id, handle=job.message.attributes.receipt_handle,
                count=job.message.attributes.receive_count, at=instants[-1],
            )  # fmt: skip
            taken += 1
            if hold_jobs is not None:
                if taken >= hold_jobs:
                    ledger.write("holding")
                    await asyncio.sleep(deadline - _real_time())
                continue
            if job.message.attributes.receive_count <= request.payload.get("fail", 0):
                await job.mark_as_failed(RuntimeError("a retry"))
                ledger.write(
                    "fail", id=request.id, count=job.message.attributes.receive_count, at=instants[-1]
                )
                continue
            actual = request.payload["actual"]
            await job.mark_as_processed(actual_tokens=actual)
            ledger.write("ack", id=request.id, handle=job.message.attributes.receipt_handle, at=instants[-1])


MODES = {
    "global": global_choice,
    "produce": produce,
    "consume": consume,
    "hold": hold,
    "limiter": limiter,
    "dispatch": dispatch,
}


def main() -> None:
    mode, raw = sys.argv[1], sys.argv[2]
    options = json.loads(raw)
    ledger = Ledger(options["ledger"])
    ledger.write("start", mode=mode)
    try:
        asyncio.run(MODES[mode](options, ledger))
    finally:
        ledger.write("exit")
        ledger.close()


if __name__ == "__main__":
    main()
