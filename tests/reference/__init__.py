"""One reference implementation, shared by the tests and the benchmarks.

- `tests.reference.scoring`: the brute-force scorer, the contract's formulas written out.
- `tests.reference.storage`: `ReferenceStorage`, a plain-Python storage adapter with the same
  semantics as `InMemoryStorage`, and `RecordingStorage`, the same with a log of calls.
"""
