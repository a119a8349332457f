"""One reference implementation, shared by the tests and the benchmarks.

- `tests.reference.scoring`: the brute-force scorer, the contract's formulas written out (and
  the ``hold_budget`` rule over it).
- `tests.reference.fair`: the ``fair_priority`` policy by brute force: its order, the reserve,
  the hold rule and the tenants' usage ledger.
- `tests.reference.storage`: `ReferenceStorage`, a plain-Python storage adapter with the same
  semantics as `InMemoryStorage`, and `RecordingStorage`, the same with a log of calls.
"""
