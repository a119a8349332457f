"""Argument checks shared by the Python entry points, so that every door refuses bad input alike
(the Rust doors share `rust/py/args.rs`)."""

from __future__ import annotations

import math

__all__ = ["finite_float", "shown"]


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


def finite_float(value: object) -> float | None:
    """``value`` as a float when it is an int or a float (not a bool) of finite value; None for
    anything else, an int too large for a float included (``math.isfinite`` and ``float`` would
    raise `OverflowError` on it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None
