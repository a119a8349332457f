"""SIGTERM and SIGINT for the workers that ask for them (``Worker(handle_signals=True)``).

Every such worker of one event loop shares one registration: the first to start saves what
each signal had (a ``signal.signal`` handler, or the very handler the host registered with
``loop.add_signal_handler``, and the wakeup fd) and installs one handler; every worker joins
it; a signal goes to all the workers registered; the last to leave puts back exactly what the
first one found. Workers that each saved and restored on their own would undo one another: the
second saves the first's handler, and unless they end in the reverse order of their start,
Ctrl-C stays with a worker that has gone (swallowed for the rest of the program) and the host's
handler is lost; and one Ctrl-C would stop only the last worker started.

Main thread only (the caller checks): Python runs signal handlers there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SignalListener", "listen", "stop_listening"]

# The Python-level handlers a signal has when nobody installed one.
_DEFAULT_HANDLERS = (signal.SIG_DFL, signal.SIG_IGN, signal.default_int_handler, None)

# The signals a worker stops on.
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class _SavedSignal:
    """What a signal had before the first worker took it, to put back exactly."""

    signum: signal.Signals
    #: ``signal.getsignal`` before (None: not installed from Python).
    python_handler: Any
    #: The loop's own handler before (``loop.add_signal_handler``), the very `asyncio.Handle`.
    loop_handle: asyncio.Handle | None
    #: The workers' shared handle, to tell whether someone replaced it meanwhile.
    ours: asyncio.Handle | None


@dataclass(eq=False)
class SignalListener:
    """One worker's registration, returned by `listen`, handed back to `stop_listening`."""

    on_signal: Callable[[signal.Signals], None]
    logger: logging.Logger
    _registry: _LoopSignals | None = None


@dataclass(eq=False)
class _LoopSignals:
    """The shared registration of one event loop."""

    loop: asyncio.AbstractEventLoop
    saved: list[_SavedSignal] = field(default_factory=list)
    wakeup: int = -1
    listeners: list[SignalListener] = field(default_factory=list)

    def dispatch(self, signum: signal.Signals) -> None:
        for listener in list(self.listeners):  # a listener may leave while being told
            try:
                listener.on_signal(signum)
            except Exception:  # one listener's failure must not keep the signal from the others
                listener.logger.exception("a worker failed to take %s", signum.name)


# The registration of each event loop that has listening workers; an entry goes with its last
# listener.
_REGISTRIES: dict[asyncio.AbstractEventLoop, _LoopSignals] = {}


def _loop_signal_table(loop: asyncio.AbstractEventLoop) -> dict[int, asyncio.Handle] | None:
    """The loop's ``add_signal_handler`` registrations, when it exposes them (asyncio's Unix
    loops keep them in ``_signal_handlers``); None for a loop that does not (uvloop)."""
    table = getattr(loop, "_signal_handlers", None)
    return table if isinstance(table, dict) else None


def _wakeup_fd() -> int:
    """The current ``signal.set_wakeup_fd`` (main thread only), read without changing it."""
    fd = signal.set_wakeup_fd(-1)
    if fd != -1:
        signal.set_wakeup_fd(fd)
    return fd


def listen(
    loop: asyncio.AbstractEventLoop, on_signal: Callable[[signal.Signals], None], logger: logging.Logger
) -> SignalListener:
    """Calls ``on_signal(signum)`` on each SIGTERM and SIGINT ``loop`` receives until
    `stop_listening`; the first listener of the loop takes the signals (see the module)."""
    listener = SignalListener(on_signal, logger)
    registry = _REGISTRIES.get(loop)
    if registry is None:
        registry = _LoopSignals(loop)
        _take_signals(registry, logger)
        _REGISTRIES[loop] = registry
    registry.listeners.append(listener)
    listener._registry = registry
    return listener


def stop_listening(listener: SignalListener) -> None:
    """Ends ``listener``; the last listener of its loop puts back what the signals had before
    the first took them, unless someone replaced the workers' handler meanwhile (then theirs
    stays). Idempotent."""
    registry, listener._registry = listener._registry, None
    if registry is None:
        return
    with contextlib.suppress(ValueError):
        registry.listeners.remove(listener)
    if registry.listeners:
        return
    if _REGISTRIES.get(registry.loop) is registry:
        del _REGISTRIES[registry.loop]
    _give_back_signals(registry)


def _take_signals(registry: _LoopSignals, logger: logging.Logger) -> None:
    loop = registry.loop
    table = _loop_signal_table(loop)
    registry.wakeup = _wakeup_fd()
    for signum in _SIGNALS:
        python_handler = signal.getsignal(signum)
        loop_handle = table.get(signum) if table is not None else None
        if table is None and python_handler not in _DEFAULT_HANDLERS:
            # Perhaps the host's own `loop.add_signal_handler`, which this loop cannot hand
            # back: leave the signal to it.
            logger.warning(
                "%s already has a handler this event loop cannot restore; the worker leaves it alone",
                signum.name,
            )
            continue
        try:
            loop.add_signal_handler(signum, registry.dispatch, signum)
        except (NotImplementedError, RuntimeError, ValueError):  # not a Unix loop
            continue
        ours = table.get(signum) if table is not None else None
        registry.saved.append(_SavedSignal(signum, python_handler, loop_handle, ours))


def _give_back_signals(registry: _LoopSignals) -> None:
    if not registry.saved:
        return
    loop = registry.loop
    table = _loop_signal_table(loop)
    for entry in reversed(registry.saved):
        if table is not None:
            if table.get(entry.signum) is not entry.ours:
                continue
            if entry.loop_handle is not None:
                # The host's very Handle back in the loop's table: the signal's C-level
                # handler and the wakeup fd are still the loop's, as before.
                table[entry.signum] = entry.loop_handle
                continue
        loop.remove_signal_handler(entry.signum)
        if entry.python_handler is not None:
            signal.signal(entry.signum, entry.python_handler)
    # Removing the loop's last handler clears the wakeup fd; give back the one there was.
    if _wakeup_fd() != registry.wakeup:
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(registry.wakeup)
