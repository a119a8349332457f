"""An integer-like number that is not an int: what numpy's integers are to the package (they
define ``__index__``), without needing numpy installed."""

from __future__ import annotations


class IntegerLike:
    """Stands for ``value`` through ``__index__`` only: no arithmetic, no comparisons, no
    ``__float__``, so a check that reads it any other way fails."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"IntegerLike({self.value})"
