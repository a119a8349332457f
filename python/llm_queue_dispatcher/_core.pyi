"""Stubs of the compiled module ``llm_queue_dispatcher._core``."""

from typing import final

__all__ = ["ManualClock", "__version__"]

__version__: str

@final
class ManualClock:
    """A clock that only moves when told to; Rust code reads it without calling Python."""

    def __new__(cls, start: float = 0.0) -> ManualClock: ...
    def now(self) -> float:
        """The current reading in seconds."""
    def advance(self, seconds: float) -> float:
        """Moves the clock forward by ``seconds`` (finite, >= 0); returns the new reading."""
    def set(self, seconds: float) -> None:
        """Sets the clock to ``seconds``, which must not be earlier than the current reading."""
    def __call__(self) -> float:
        """The current reading: a ManualClock is also a plain callable clock."""
