"""Argument checks shared by the Python entry points, so that every door refuses bad input alike
(the Rust doors share `rust/py/args.rs`)."""

from __future__ import annotations

import math
import operator

from .errors import InvalidRequestError

__all__ = ["finite_float", "integer", "real_number", "shown", "timeout_seconds"]


def shown(value: object) -> str:
    """``repr(value)`` for an error message. Never raises: building the error for a bad value
    must not raise another (an int past Python's digit limit has no repr, and a user's
    ``__repr__`` may raise)."""
    try:
        return repr(value)
    except Exception:
        if isinstance(value, int):
            return f"<int of {value.bit_length()} bits>"
        return f"<{type(value).__name__} object>"


def real_number(value: object) -> float | None:
    """``value`` as a float when it is a number: an int, a float, or an integer-like object
    (one with ``__index__``, such as ``numpy.int64``); never a bool. An int too large for a float
    reads as ``inf`` (or ``-inf``); NaN and the infinities pass through for the caller to judge.
    None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        return float(value)
    if not isinstance(value, int):
        try:
            value = operator.index(value)  # type: ignore[arg-type]  # TypeError when it has no __index__
        except TypeError:
            return None
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def finite_float(value: object) -> float | None:
    """``value`` as a float when it is a number (`real_number`: an int, a float or an
    integer-like object, not a bool) of finite value; None for anything else, an int too large
    for a float included (``math.isfinite`` and ``float`` would raise `OverflowError` on it)."""
    number = real_number(value)
    return number if number is not None and math.isfinite(number) else None


def integer(value: object) -> int | None:
    """``value`` as an int when it is one (not a bool) or an integer-like object (with
    ``__index__``, such as ``numpy.int64``); None for anything else, a float included."""
    if isinstance(value, (bool, float)):
        return None
    if isinstance(value, int):
        return int(value)
    try:
        return operator.index(value)  # type: ignore[arg-type]  # TypeError when it has no __index__
    except TypeError:
        return None


def timeout_seconds(timeout: object) -> float | None:
    """A wait's ``timeout``: None (do not wait), or a number of seconds >= 0 as a float; anything
    else raises `InvalidRequestError`. The sign is checked on the value given: an int too large
    for a float waits for ever if positive, and is refused if negative."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise InvalidRequestError(f"timeout must be None or a number of seconds >= 0, got {shown(timeout)}")
    try:
        return float(timeout)
    except OverflowError:
        return math.inf
