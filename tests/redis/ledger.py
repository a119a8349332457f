"""A ledger of deliveries and the checker that judges it.

Every process of a fault test appends JSON lines to its own ledger file with one unbuffered
``os.write`` per event on an ``O_APPEND`` descriptor, so a ``kill -9`` loses no event that
happened before it. Events:

* ``enq``   a producer's enqueue was acknowledged by Redis (the message must never be lost);
  ``enq_uncertain`` it took a retry after an attempt whose outcome was unknown (Redis may have
  stored that one too: if it was processed before the retry, the retry stores a second copy);
* ``recv``  a consumer received a message (id, receipt handle, receive count);
* ``deleting`` a consumer is about to delete (so a delete that Redis applied for a process
            killed before it could write ``ack`` is not mistaken for a loss);
* ``ack``   its delete succeeded; ``ack_unknown`` the delete's reply was lost (Redis may have
            applied it); ``stale`` the delete was refused (the handle is no longer current);
* anything else a scenario wants to record (``grant``, ``refused``, ...).

`check` counts, over the ids a test enqueued:

* lost: enqueued, never acknowledged (nor ``ack_unknown``, nor ``deleting`` in a process the
  test killed), not dead-lettered (tests also check that the queue ends empty);
* unexpected: received or acknowledged though never enqueued;
* duplicates: received more than once; *unexplained* unless every earlier delivery ended
  without an acknowledgement in a process the test killed, or (when the scenario lets leases
  run out) without an acknowledgement at all, or its producer's enqueue was uncertain (then
  two copies may have been stored); an id acknowledged twice is unexplained but for the latter.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Ledger:
    """One process's append-only ledger file."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.pid = os.getpid()

    def write(self, event: str, **fields: Any) -> None:
        record = {"event": event, "pid": self.pid, "t": time.time(), **fields}
        os.write(self._fd, (json.dumps(record) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


def read_ledgers(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every event of the given files (a torn last line of a killed process is skipped)."""
    records: list[dict[str, Any]] = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


@dataclass
class Verdict:
    lost: set[str] = field(default_factory=set)
    unexpected: set[str] = field(default_factory=set)
    duplicates: set[str] = field(default_factory=set)
    unexplained_duplicates: set[str] = field(default_factory=set)

    @property
    def clean(self) -> bool:
        return not (self.lost or self.unexpected or self.unexplained_duplicates)


def check(
    enqueued: set[str],
    records: list[dict[str, Any]],
    *,
    killed: set[int] = frozenset(),  # type: ignore[assignment]
    leases_may_expire: bool = False,
    dead_lettered: set[str] = frozenset(),  # type: ignore[assignment]
) -> Verdict:
    """Judges a run (see the module docstring)."""
    verdict = Verdict()
    acknowledged: Counter[str] = Counter()
    settled_handles: set[str] = set()
    deliveries: dict[str, list[dict[str, Any]]] = defaultdict(list)
    uncertain = {record["id"] for record in records if record["event"] == "enq_uncertain"}
    for record in records:
        event = record["event"]
        if event == "recv":
            deliveries[record["id"]].append(record)
        elif event == "ack":
            settled_handles.add(record["handle"])
            acknowledged[record["id"]] += 1
        elif event == "ack_unknown" or (event == "deleting" and record["pid"] in killed):
            # Perhaps applied, perhaps not (then the lease ran out and the message came back):
            # not lost, and not a settled delivery either.
            acknowledged[record["id"]] += 0
        if event in ("recv", "deleting", "ack", "ack_unknown") and record["id"] not in enqueued:
            verdict.unexpected.add(record["id"])
    verdict.lost = {rid for rid in enqueued if rid not in acknowledged and rid not in dead_lettered}
    for rid, count in acknowledged.items():
        if count > 1 and rid not in uncertain:
            verdict.unexplained_duplicates.add(rid)
    for rid, received in deliveries.items():
        if len(received) < 2:
            continue
        verdict.duplicates.add(rid)
        if rid in uncertain:
            continue
        for earlier in received[:-1]:
            unsettled = earlier["handle"] not in settled_handles
            if not (unsettled and (earlier["pid"] in killed or leases_may_expire)):
                verdict.unexplained_duplicates.add(rid)
    return verdict
