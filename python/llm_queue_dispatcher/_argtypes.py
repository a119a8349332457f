"""Argument types shared by the ``llmqd`` subcommands: each parses one flag's text or raises
`argparse.ArgumentTypeError`, which argparse reports as a usage error naming the flag."""

from __future__ import annotations

import argparse
import math

__all__ = ["count", "fraction", "limit_per_minute", "non_negative", "positive", "share", "tokens"]


def _number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive(text: str) -> float:
    """A finite number > 0 (limits, durations)."""
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def limit_per_minute(text: str) -> float:
    """A rate limit per minute (``--rpm``, ``--tpm``): a finite number >= 1, the rule of
    `LLMThrottle`, whose bucket must hold at least one request and one token. Refused in one
    line naming the flag (argparse adds it), before anything runs."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number of requests or tokens per minute, got {text!r}"
        ) from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    if not value >= 1:
        raise argparse.ArgumentTypeError(
            f"must be >= 1 (a limit below one per minute never admits a request), got {text}"
        )
    return value


def non_negative(text: str) -> float:
    """A finite number >= 0 (delays, grace periods)."""
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def count(text: str) -> int:
    """An integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def tokens(text: str) -> int:
    """An integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def share(text: str) -> float:
    """A number within [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {text}")
    return value


def fraction(text: str) -> float:
    """A number within [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1), got {text}")
    return value
