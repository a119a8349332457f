"""Worker: SIGTERM and SIGINT, and the host application's own signal handlers."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from llm_queue_dispatcher import ProcessableMessage, Worker, create_in_memory_queue
from tests.worker.support import fill, noop, roomy_limiter

_SIGNAL_SCRIPT = """
import asyncio, os, signal, sys, time
from llm_queue_dispatcher import LLMRequest, LLMThrottle, TokenInfo, Worker, create_in_memory_queue

SIG = getattr(signal, sys.argv[1])

async def main():
    dispatcher = create_in_memory_queue()
    for n in range(4):
        await dispatcher.enqueue(LLMRequest(f"r{n}", n, token_info=TokenInfo(10)))
    started = asyncio.Event()
    async def handle(job):
        started.set()
        await asyncio.sleep(float(sys.argv[2]))
        return 1
    worker = Worker(
        dispatcher, LLMThrottle(6000, 1e6), handle, concurrency=2, shutdown_grace=0.5, handle_signals=True
    )
    before = signal.getsignal(SIG)
    run = asyncio.ensure_future(worker.run())
    await started.wait()
    os.kill(os.getpid(), SIG)
    stats = await asyncio.wait_for(run, 5)
    assert signal.getsignal(SIG) is before, (signal.getsignal(SIG), before)
    queue = (await dispatcher.get_queue_metrics()).queue
    print(worker.stop_signal.name, stats.processed, stats.released, queue.approximate_number_of_messages,
          queue.approximate_number_of_messages_in_flight)

asyncio.run(main())
"""


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_signals_stop_gracefully_and_the_previous_handlers_come_back(name: str) -> None:
    # In a child process: a signal the worker failed to catch would kill the test runner.
    fast = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SIGNAL_SCRIPT), name, "0.1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert fast.returncode == 0, fast.stderr
    # Both running handlers finished within the grace; the two others were never taken.
    assert fast.stdout.split() == [name, "2", "0", "2", "0"]
    slow = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SIGNAL_SCRIPT), name, "30"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert slow.returncode == 0, slow.stderr
    # Past the grace: both released, all four visible again.
    assert slow.stdout.split() == [name, "0", "2", "4", "0"]


def test_worker_signal_handlers_are_only_installed_in_the_main_thread() -> None:
    result: list[object] = []

    def in_thread() -> None:
        async def main() -> None:
            dispatcher = create_in_memory_queue()
            worker = Worker(dispatcher, roomy_limiter(), noop, handle_signals=True)
            run = asyncio.ensure_future(worker.run())
            await asyncio.sleep(0.05)
            worker.stop()
            result.append(await run)

        asyncio.run(main())

    import threading

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(10)
    assert result
    assert signal.getsignal(signal.SIGTERM) is before


async def test_by_default_a_worker_leaves_the_host_applications_signal_handlers_alone() -> None:
    # The host: an aiohttp-like app took SIGINT through its event loop and SIGTERM through
    # signal.signal, as web.run_app and uvicorn do.
    loop = asyncio.get_running_loop()
    host_calls: list[str] = []
    previous_sigterm = signal.getsignal(signal.SIGTERM)

    def host_sigterm(signum: int, frame: object) -> None:
        host_calls.append("SIGTERM")

    loop.add_signal_handler(signal.SIGINT, host_calls.append, "SIGINT")
    signal.signal(signal.SIGTERM, host_sigterm)
    try:
        host_sigint = loop._signal_handlers[signal.SIGINT]  # type: ignore[attr-defined]
        seen_while_running: list[tuple[object, object]] = []
        dispatcher = create_in_memory_queue()
        await fill(dispatcher, 1)

        async def handle(job: ProcessableMessage[Any]) -> None:
            seen_while_running.append(
                (loop._signal_handlers.get(signal.SIGINT), signal.getsignal(signal.SIGTERM))  # type: ignore[attr-defined]
            )

        worker = Worker(dispatcher, roomy_limiter(), handle)
        await asyncio.wait_for(worker.run(stop_when_empty=True), 5)
        assert seen_while_running == [(host_sigint, host_sigterm)]
        assert loop._signal_handlers[signal.SIGINT] is host_sigint  # type: ignore[attr-defined]
        assert signal.getsignal(signal.SIGTERM) is host_sigterm
        assert host_calls == []
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        signal.signal(signal.SIGTERM, previous_sigterm)


_HOST_SCRIPT = """
import asyncio, os, signal, sys
from llm_queue_dispatcher import LLMRequest, LLMThrottle, TokenInfo, Worker, create_in_memory_queue

HOW = sys.argv[1]

def wakeup_fd():
    fd = signal.set_wakeup_fd(-1)
    if fd != -1:
        signal.set_wakeup_fd(fd)
    return fd

async def main():
    loop = asyncio.get_running_loop()
    host_calls = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        if HOW == "loop":  # as aiohttp's web.run_app does
            loop.add_signal_handler(signum, host_calls.append, signum.name)
        else:
            signal.signal(signum, lambda number, frame: host_calls.append(signal.Signals(number).name))
    def handlers():
        return {signum: (signal.getsignal(signum), loop._signal_handlers.get(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    before, fd_before = handlers(), wakeup_fd()

    dispatcher = create_in_memory_queue()
    for n in range(2):
        await dispatcher.enqueue(LLMRequest(f"r{n}", n, token_info=TokenInfo(10)))
    started = asyncio.Event()
    async def handle(job):
        started.set()
        await asyncio.sleep(0.1)
        return 1
    worker = Worker(dispatcher, LLMThrottle(6000, 1e6), handle, concurrency=1, handle_signals=True)
    run = asyncio.ensure_future(worker.run())
    await started.wait()
    os.kill(os.getpid(), signal.SIGTERM)
    stats = await asyncio.wait_for(run, 5)
    # The worker took the signal while it ran, not the host.
    print(worker.stop_signal.name, stats.processed, host_calls == [])
    after = handlers()
    # The very same handlers and the same wakeup fd as before the run.
    print(all(after[s][0] is before[s][0] and after[s][1] is before[s][1] for s in before),
          wakeup_fd() == fd_before)
    # And they work: the host gets its signals again.
    for signum in (signal.SIGINT, signal.SIGTERM):
        os.kill(os.getpid(), signum)
    for _ in range(500):
        if len(host_calls) == 2:
            break
        await asyncio.sleep(0.01)
    print(*sorted(host_calls))

asyncio.run(main())
"""


@pytest.mark.parametrize("how", ["loop", "signal"])
def test_with_handle_signals_the_host_applications_own_handlers_are_restored_exactly(how: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_HOST_SCRIPT), how],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SIGTERM", "1", "True", "True", "True", "SIGINT", "SIGTERM"]


_TWO_WORKERS_SCRIPT = """
import asyncio, os, signal, sys
from llm_queue_dispatcher import LLMThrottle, Worker, create_in_memory_queue

HOW, ENDING = sys.argv[1], sys.argv[2]

def wakeup_fd():
    fd = signal.set_wakeup_fd(-1)
    if fd != -1:
        signal.set_wakeup_fd(fd)
    return fd

async def main():
    loop = asyncio.get_running_loop()
    host_calls = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        if HOW == "loop":
            loop.add_signal_handler(signum, host_calls.append, signum.name)
        else:
            signal.signal(signum, lambda number, frame: host_calls.append(signal.Signals(number).name))
    def handlers():
        return {signum: (signal.getsignal(signum), loop._signal_handlers.get(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    before, fd_before = handlers(), wakeup_fd()

    async def handle(job):
        return 1
    first, second = (
        Worker(create_in_memory_queue(), LLMThrottle(6000, 1e6), handle, handle_signals=True)
        for _ in range(2)
    )
    runs = {first: asyncio.ensure_future(first.run()), second: asyncio.ensure_future(second.run())}
    await asyncio.sleep(0.1)
    if ENDING == "together":
        # One signal stops every worker of the process.
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*runs.values()), 5)
        print(first.stop_signal.name, second.stop_signal.name)
    else:
        leaving, staying = (first, second) if ENDING == "first" else (second, first)
        leaving.stop()
        await asyncio.wait_for(runs[leaving], 5)
        # The worker still running gets the signal, not the one gone nor the host.
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.wait_for(runs[staying], 5)
        print(leaving.stop_signal, staying.stop_signal.name)
    print(host_calls == [])
    after = handlers()
    print(all(after[s][0] is before[s][0] and after[s][1] is before[s][1] for s in before),
          wakeup_fd() == fd_before)
    for signum in (signal.SIGINT, signal.SIGTERM):
        os.kill(os.getpid(), signum)
    for _ in range(500):
        if len(host_calls) == 2:
            break
        await asyncio.sleep(0.01)
    print(*sorted(host_calls))

asyncio.run(main())
"""


@pytest.mark.parametrize("how", ["loop", "signal"])
@pytest.mark.parametrize("ending", ["first", "last"])
def test_several_workers_with_handle_signals_end_in_any_order_and_the_host_gets_its_handlers_back(
    how: str, ending: str
) -> None:
    # "first": the worker started first ends first; "last": the one started last ends first.
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_TWO_WORKERS_SCRIPT), how, ending],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "SIGINT", "True", "True", "True", "SIGINT", "SIGTERM"]


@pytest.mark.parametrize("how", ["loop", "signal"])
def test_one_signal_stops_every_worker_with_handle_signals(how: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_TWO_WORKERS_SCRIPT), how, "together"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SIGTERM", "SIGTERM", "True", "True", "True", "SIGINT", "SIGTERM"]
