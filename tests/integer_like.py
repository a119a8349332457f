"""Integer-like numbers that are not ints: what numpy's integers are to the package (they define
``__index__``), without needing numpy installed."""

from __future__ import annotations


class IntLike:
    """Stands for ``value`` through ``__index__`` only, as numpy's integers can: no arithmetic, no
    comparisons, no ``__float__``, so a check that reads it any other way fails."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"IntLike({self.value})"


class BrokenIndex:
    def __index__(self) -> int:
        raise RuntimeError("not ours to hide")


def int_likes(value: int = 5) -> list[object]:
    """`IntLike` always; numpy's integers too when numpy is installed (it is not a dependency)."""
    values: list[object] = [IntLike(value)]
    try:
        import numpy
    except ImportError:
        return values
    return [*values, numpy.int64(value), numpy.uint16(value), numpy.int8(value)]
