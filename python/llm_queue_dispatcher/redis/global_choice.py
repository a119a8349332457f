"""The global choice: the score policy and `fair_priority` ranked over the whole Redis queue,
in one round trip.

With `RedisStorage`, the score policy without custom scorers or the `fair_priority` policy
(with ``hold_budget`` and ``reserve_budget``, the defaults) and a `RedisThrottle` on the same
server and namespace, `LLMQueueDispatcher.dequeue` does not fill a per-process prefetch buffer:
one script finds the winner over every visible message of the queue, reserves its budget at the
limiter under the delivery's key (``"request-id#n"``) and leases it. For the score policy that
is ``lua/score_dispatch.lua``: the best score (``lua/score_rank.lua``, the in-memory rules with
the budget held), found by bounding cells of an index that holds no weight, so processes with
other weights share it. For `fair_priority` it is ``lua/global_dispatch.lua``: the first message
of the fair order, the tenants' token use being one record in Redis, charged at that dispatch
and corrected by the mark. The mark is one script too (``lua/global_mark.lua``: the store's
step, the limiter's correction and the charge's). Every process that shares the queue then sees
one order (and one ledger of tenant use).

The ranking indexes the scripts read are kept by every queue script (``lua/queue_common.lua``,
``lua/score_index.lua``) as messages are enqueued, received, released, dead-lettered, deleted
and expire. A queue written before an index existed is indexed by the first global dispatch
(``lua/index_scan.lua``, ``lua/index_fill.lua``, ``lua/score_fill.lua``). A dispatch cancelled
or timed out while its reply was in flight is sent again in the background and its winners
given back (lease, reservation, charge).

Co-location: a queue's keys and a limiter's keys share the hash tag ``{namespace}``, so a
`RedisThrottle` of the storage's namespace is in the queue's Redis Cluster slot. The global
choice is used only with such a limiter whose client points at the same server (host, port,
database or socket path) as the storage's; the script runs on the storage's connection.
Otherwise (another limiter, custom scorers, ``hold_budget=False``, ``drop_expired``) the
dispatcher keeps its per-process prefetch buffer: custom scorers run Python, so they cannot
rank inside Redis.

Every process sharing a queue should pass the same `FairPriorityConfig` (or score weights):
each call applies the fairness window, tenant weights and aging (the weights) of the process
that makes it.

About 870 lines for one concept, the Python half of those scripts: the dispatch call and its
batching, the recovery of a dispatch whose reply was lost, the first indexing of an older queue
and the marks' batching all share the script wrapper and the delivery keys handed out here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import secrets
from collections.abc import Coroutine
from functools import cache
from typing import TYPE_CHECKING, Any

from .._core import DispatchCore, Plan, ProcessableMessage
from ..config import FairPriorityConfig, LLMQueueDispatcherConfig
from ..errors import StorageError
from ..scoring import ScoringConfig, ScoringWeights
from ..types import QueueMessage
from ._connection import CLIENT_ERRORS, Script, _source, host_microseconds, prelude
from .storage import RedisStorage, _index_fields
from .throttle import RedisThrottle

if TYPE_CHECKING:
    import redis.asyncio

__all__ = ["GlobalChoice"]

# The most winners one call takes (WINNERS_MAX in global_dispatch.lua).
_MOST_WINNERS = 64
# The most marks one call makes (MARKS_MAX in global_mark.lua).
_MOST_MARKS = 64
# The most tenant heads one call reads (HEADS_MAX in global_dispatch.lua): a call takes at most
# this many divided by the tenants with visible messages winners, at least one.
_HEADS_PER_CALL = 4096

_LOGGER = logging.getLogger("llm_queue_dispatcher")

# The limiter's operations a global script calls, each the body of limiter_call(KEYS, ARGV, op).
_LIMITER_OPERATIONS = (
    ("consume", "limiter_consume"),
    ("adjust", "limiter_adjust"),
    ("release", "limiter_release"),
    ("settle", "limiter_settle"),
    ("check", "limiter_check"),
)


@dataclasses.dataclass
class _Won:
    """A winner for one caller of `GlobalChoice.attempt`: its fields from the script."""

    fields: list[Any]


# The answer to a caller of `GlobalChoice.attempt` the shared call found no winner for.
_ALONE = object()


@dataclasses.dataclass(slots=True)
class _Mark:
    """A mark waiting for its script call: its ten arguments (global_mark.lua) and the future its
    caller awaits. With ``plan`` (a job's mark, `GlobalChoice.settled`), the call is made even
    if that caller is cancelled, and its reply is told to the dispatcher's books by the call's
    sender; the caller's future then gets what the books say (None or their error)."""

    limiter: RedisThrottle
    fields: tuple[Any, ...]
    future: asyncio.Future[Any]
    plan: Plan | None = None
    # Whether the books were told the end of ``plan``'s mark (`GlobalChoice._tell_books`).
    told: bool = False


class _GlobalScript(Script):
    """A global script: ``common.lua``, the queue's prelude, the limiter's prelude and
    operations wrapped as the function ``limiter_open(KEYS, ARGV)`` (so they read their own
    keys and arguments, and their locals do not meet the queue's), then the operation.

    ``limiter_open`` runs the limiter's prelude once (its state read, at one instant) and
    returns ``session, nil``; when the script asks for it and the limiter is RPM + TPM alone,
    ``nil, LEAN`` instead (the lean session of ``limiter_common.lua``, which stores the same).
    ``session(op, args)`` runs operation ``op`` with ``args`` as its own arguments
    (ARGV[15..]): the operations of one script share one read of the limiter's state, each
    saving what it changed, as if each were a call of its own at that instant. A session whose
    operation raised an error must not be used again (its state in memory may be ahead of what
    was saved). ``limiter_call(KEYS, ARGV, op)`` is one operation in a session of its own."""

    def __init__(self, name: str) -> None:
        branches = "\n".join(
            f"{'if' if i == 0 else 'elseif'} op == '{op}' then\n{_source(file)}"
            for i, (op, file) in enumerate(_LIMITER_OPERATIONS)
        )
        # 'reserve': consume (ARGV[15..18]) only if the TPM bucket also holds ARGV[19] tokens
        # (the estimate and the reserves it must leave; the other limits count the estimate, or
        # its parts when given, alone), in one run of the limiter's prelude.
        branches += (
            "\nelseif op == 'reserve' then\n"
            "local reason, wait = check(tonumber(ARGV[16]), tonumber(ARGV[17]), tonumber(ARGV[18]),"
            " tonumber(ARGV[19]) - tonumber(ARGV[16]))\n"
            "if reason ~= '' then\nreturn {0, reason, exact(wait)}\nend\nPRECHECKED = true\n"
            f"{_source('limiter_consume')}"
            # 'defer': save() waits for 'flush' (limiter_common.lua, DEFER_SAVE): the dispatch
            # scripts save the limiter's state once for all their grants.
            "\nelseif op == 'defer' then\nDEFER_SAVE = true\n"
            # 'defer_drops': the records its grants push out of the history are dropped by
            # 'flush' too, together (DEFER_DROPS in limiter_common.lua): global_dispatch.lua's.
            "elseif op == 'defer_drops' then\nDEFER_DROPS = DEFER_SAVE\n"
            "elseif op == 'flush' then\nflush()\n"
            # The global mark script's: see checkpoint() in limiter_common.lua.
            "elseif op == 'checkpoint' then\ncheckpoint()\n"
            "elseif op == 'rollback' then\nrollback()\n"
        )
        limiter = (
            f"local function limiter_open(KEYS, ARGV)\n{_source('limiter_common')}\n"
            "return function(op, args)\n"
            "if args ~= nil then\n"
            "-- Bounded: the operations' arguments (at most ten).\n"
            "for i = 1, 10 do\nARGV[14 + i] = args[i]\nend\n"
            f"end\n{branches}\nend\nend\nend\n"
            "local function limiter_call(KEYS, ARGV, op)\nreturn limiter_open(KEYS, ARGV)(op)\nend"
        )
        # The dispatch scripts share dispatch_common.lua; the score policy's ranks with
        # score_rank.lua.
        if name == "score_dispatch":
            operation = f"{_source('dispatch_common')}\n{_source('score_rank')}\n{_source(name)}"
        elif name == "global_dispatch":
            operation = f"{_source('dispatch_common')}\n{_source(name)}"
        else:
            operation = _source(name)
        self.name = name
        self.source = f"{_source('common')}\n{prelude('queue_common')}\n{limiter}\n{operation}"
        self.sha = hashlib.sha1(self.source.encode("utf-8")).hexdigest()


@cache
def _script(name: str) -> _GlobalScript:
    return _GlobalScript(name)


def _server_of(client: redis.asyncio.Redis) -> tuple[Any, ...]:
    """Where a client connects: host, port, database, socket path."""
    kwargs = client.connection_pool.connection_kwargs
    return (kwargs.get("host"), kwargs.get("port"), kwargs.get("db", 0), kwargs.get("path"))


# A span of more microseconds than this (about 146,000 years) counts as forever: beyond about
# 1e302 s, seconds * 1e6 is inf, which round() refuses.
_FOREVER_US = 2**62


def _us(seconds: float) -> str:
    """A span in microseconds for the scripts, '' for never (inf)."""
    return "" if not math.isfinite(seconds) else str(round(min(seconds * 1_000_000, _FOREVER_US)))


def _winner_fields(reply: list[Any]) -> list[list[Any]]:
    """The winners of a dispatch script's reply (seven fields each from its third element),
    each with an eighth, its withdrawal flag (``b"1"``, ``b"0"``), when the script sent them
    (global_dispatch.lua's last element: a character per winner)."""
    count = (len(reply) - 2) // 7
    winners = [reply[2 + 7 * i : 9 + 7 * i] for i in range(count)]
    if len(reply) == 3 + 7 * count and count:
        flags = reply[-1]
        for i, fields in enumerate(winners):
            fields.append(flags[i : i + 1])
    return winners


def _encoded(arguments: tuple[Any, ...]) -> tuple[bytes, ...]:
    """Script arguments as the bytes the client would send for them."""
    return tuple(arg if isinstance(arg, bytes) else str(arg).encode() for arg in arguments)


async def _together(calls: list[Coroutine[Any, Any, None]]) -> None:
    """``asyncio.gather(*calls)``; one call (the usual case: one limiter) is awaited as it is,
    without the task and the future `gather` makes."""
    if len(calls) == 1:
        await calls[0]
    else:
        await asyncio.gather(*calls)


class GlobalChoice:
    """The global choice of one dispatcher over one `RedisStorage` (see the module docstring)."""

    def __init__(
        self, storage: RedisStorage[Any], config: LLMQueueDispatcherConfig, core: DispatchCore
    ) -> None:
        self._storage = storage
        self._core = core
        self._timeout = float(config.visibility_timeout)
        fair = config.fair_priority or FairPriorityConfig()
        max_wait = fair.max_wait_by_priority()
        weights: list[Any] = []
        for tenant, weight in fair.tenant_weights.items():
            weights += (tenant.encode("utf-8", "surrogatepass"), repr(float(weight)))
        self._fair_args: tuple[Any, ...] = (
            _us(float(fair.fairness_window)),  # finite (FairPriorityConfig)
            "1" if fair.urgent_first else "0",
            _us(max_wait[2]),
            _us(max_wait[3]),
        )
        self._weights: tuple[Any, ...] = (
            "" if fair.reserve_tokens is None else repr(float(fair.reserve_tokens)),
            "" if config.urgent_reserve is None else repr(float(config.urgent_reserve)),
            str(len(fair.tenant_weights)),
            *weights,
        )
        # The score policy (score_dispatch.lua) or fair_priority (global_dispatch.lua).
        self._dispatch_script = "score_dispatch" if config.policy == "score" else "global_dispatch"
        scoring = (config.scoring or ScoringConfig()).weights or ScoringWeights()
        self._score_args: tuple[Any, ...] = (
            *(repr(float(weight)) for weight in scoring.as_tuple()),
            "1" if config.score_urgent_first() else "0",
            "" if config.urgent_reserve is None else repr(float(config.urgent_reserve)),
            repr(float(config.min_score_threshold)),
        )
        # Sent with every dispatch: encoded once here rather than by the client at each call.
        self._fair_args = _encoded(self._fair_args)
        self._weights = _encoded(self._weights)
        self._score_args = _encoded(self._score_args)
        # Whether this process told the queue that the score policy dispatches from it.
        self._score_announced = False
        # Delivery keys handed out here, whose marks go through `mark` (one script each): True
        # when the dispatch found that nobody withdrew the request (`claimed`).
        self._keys: dict[str, bool] = {}
        # Their receipt handles with the handles' parts (member, lease token), for the marks.
        self._leases: dict[str, tuple[str, str, str]] = {}
        # What `close` waits for: dispatches cancelled while in flight whose winners are being
        # given back, winners given back, the calls of `attempt` and `_marked` on their way.
        self._recoveries: set[asyncio.Task[None]] = set()
        # Dispatches asked and the task that sends them (`attempt`).
        self._asks: list[tuple[RedisThrottle, asyncio.Future[Any]]] = []
        self._asker: asyncio.Task[None] | None = None
        # The last limiter `usable_with` accepted.
        self._usable_limiter: RedisThrottle | None = None
        # Marks waiting for their script call, and the task that sends them (`_marked`).
        self._marks: list[_Mark] = []
        self._sender: asyncio.Task[None] | None = None

    @staticmethod
    def for_dispatcher(
        storage: object, config: LLMQueueDispatcherConfig, core: DispatchCore, custom_scorers: bool
    ) -> GlobalChoice | None:
        """The global choice for this dispatcher, or None where it does not apply."""
        applies = (
            isinstance(storage, RedisStorage)
            and config.policy in ("fair_priority", "score")
            and not custom_scorers
            and config.hold_budget
            and config.reserve_budget
            and not config.drop_expired
        )
        return GlobalChoice(storage, config, core) if applies else None  # type: ignore[arg-type]

    def usable_with(self, limiter: object) -> bool:
        """Whether ``limiter`` is a `RedisThrottle` co-located with the queue: the same namespace
        (hash tag) on the same server."""
        if limiter is self._usable_limiter:
            return True
        if not isinstance(limiter, RedisThrottle):
            return False
        storage = self._storage
        usable = limiter.namespace == storage.namespace and (
            limiter.redis is storage.redis or _server_of(limiter.redis) == _server_of(storage.redis)
        )
        if usable:
            # Asked at every dispatch and mark: the last limiter found usable is known at once
            # (its namespace and client never change).
            self._usable_limiter = limiter
        return usable

    def _call(
        self, limiter: RedisThrottle, args: tuple[Any, ...], tail: tuple[Any, ...] = ()
    ) -> tuple[list[bytes], list[Any]]:
        storage = self._storage
        token = secrets.token_hex(16)
        keys = [*storage._keys, *limiter._keys, f"{storage._reply_prefix}{token}".encode()]
        arguments = [
            storage._time_argument(),
            token,
            *storage._settings,
            *args,
            limiter._time_argument(),
            *limiter._settings,
            *tail,
        ]
        return keys, arguments

    async def _run(
        self, name: str, limiter: RedisThrottle, args: tuple[Any, ...], tail: tuple[Any, ...] = ()
    ) -> Any:
        """Runs global script ``name``: ``args`` after the store's arguments, ``tail`` after
        the limiter's."""
        keys, arguments = self._call(limiter, args, tail)
        storage = self._storage
        try:
            return await storage._connection.run(_script(name), keys, arguments)
        except asyncio.CancelledError:
            if name in ("global_dispatch", "score_dispatch"):
                # The script may have run, its winners leased and reserved for nobody: the same
                # call again is answered with them (its reply key), and they go back at once.
                self._start_recovery(limiter, keys, arguments)
            raise
        except CLIENT_ERRORS as exc:
            if name in ("global_dispatch", "score_dispatch"):
                # The same for a reply lost to a timeout (a dropped connection is resent by the
                # client already; if that failed too, the recovery fails as well and says so).
                self._start_recovery(limiter, keys, arguments)
            storage._fail(name, exc)

    async def attempt(self, limiter: RedisThrottle) -> ProcessableMessage[Any] | float | None:
        """One global dispatch: the job handed out, the seconds until the held winner fits, or
        None (nothing visible that can ever fit).

        The dispatches asked in the same turn of the event loop, or while the previous call was
        on its way (several tasks dequeuing at once), go in one script call for as many winners
        as callers, one to each: the winners successive single dispatches would give. A caller
        left without one (the call found fewer) dispatches alone. A caller cancelled before it
        has its winner leaves it to be given back whole (lease, reservation and charge)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._asks.append((limiter, future))
        if self._asker is None:
            self._asker = loop.create_task(self._send_asks())
            self._track(self._asker)
        try:
            answer = await future
        except asyncio.CancelledError:
            won = future.done() and not future.cancelled() and future.exception() is None
            if won and isinstance(future.result(), _Won):
                # Its winner came, but the cancellation reached it first: nobody will open it.
                self._start_give_back(limiter, future.result().fields)
            raise
        if isinstance(answer, _Won):
            return await self._open(limiter, float(limiter.burst_tpm or limiter.tpm), answer.fields)
        if answer is _ALONE:
            found = await self.attempt_many(limiter, 1)
            if isinstance(found, list):
                return found[0] if found else None
            return found
        result: float | None = answer
        return result

    async def _send_asks(self) -> None:
        """Answers the dispatches asked (`attempt`), those of one limiter together, up to
        ``_MOST_WINNERS`` per call; then those asked meanwhile, until none waits."""
        try:
            await asyncio.sleep(0)  # the dispatches of this turn of the event loop join
            while self._asks:
                asks, self._asks = self._asks, []
                groups: dict[int, list[tuple[RedisThrottle, asyncio.Future[Any]]]] = {}
                for limiter, future in asks:
                    if not future.done():  # a caller cancelled before the call was sent
                        groups.setdefault(id(limiter), []).append((limiter, future))
                await _together(
                    [
                        self._answer(group[i : i + _MOST_WINNERS])
                        for group in groups.values()
                        for i in range(0, len(group), _MOST_WINNERS)
                    ]
                )
        finally:
            self._asker = None
            for _, future in self._asks:  # left by a cancelled sender: nothing sent them
                future.cancel()
            self._asks = []

    async def _answer(self, group: list[tuple[RedisThrottle, asyncio.Future[Any]]]) -> None:
        """One dispatch call for the callers of ``group`` (one limiter): a winner each, in the
        order they asked; the wait or None to all when the first winner does not fit or none is
        visible."""
        limiter = group[0][0]
        try:
            found = await self._winners(limiter, len(group))
        except BaseException as error:
            for _, future in group:
                if future.done():
                    continue
                if isinstance(error, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(
                        StorageError(str(error)) if isinstance(error, StorageError) else error
                    )
            if not isinstance(error, Exception):
                raise
            return
        if not isinstance(found, list):
            for _, future in group:
                if not future.done():
                    future.set_result(found)
            return
        winners = iter(found)
        for _, future in group:
            if future.done():
                continue  # cancelled while the call was on its way
            fields = next(winners, None)
            future.set_result(_ALONE if fields is None else _Won(fields))
        # The winners of callers cancelled while the call was on its way: given back whole.
        left = list(winners)
        if left:
            await asyncio.gather(
                *(
                    self._give_back(limiter, fields[0].decode(), fields[5].decode(), "release")
                    for fields in left
                )
            )

    def _start_give_back(self, limiter: RedisThrottle, fields: list[Any]) -> None:
        """Gives back, in a task `close` waits for, a winner nobody will open."""
        self._track(
            asyncio.get_running_loop().create_task(
                self._give_back(limiter, fields[0].decode(), fields[5].decode(), "release")
            )
        )

    def pending(self) -> set[asyncio.Task[None]]:
        """The tasks the dispatcher's `close` waits for (a copy): winners of cancelled
        dispatches being given back, winners given back, calls on their way."""
        return set(self._recoveries)

    def _track(self, task: asyncio.Task[None]) -> None:
        """A task the dispatcher's `close` waits for (``_recoveries``): a call on its way, a
        give-back."""
        self._recoveries.add(task)
        task.add_done_callback(self._recoveries.discard)

    async def attempt_many(
        self, limiter: RedisThrottle, count: int
    ) -> list[ProcessableMessage[Any]] | float | None:
        """Up to ``count`` winners in rank order, each reserved and leased, in one script (the
        order is the one successive single dispatches would give, with no other dispatch
        between them); or, when the first winner does not fit, the seconds until it does; or
        None. Fewer than ``count`` when the queue holds fewer, a later winner does not fit, or
        many tenants have visible messages (at most ``_HEADS_PER_CALL`` / tenants, at least one)."""
        capacity = float(limiter.burst_tpm or limiter.tpm)
        found = await self._winners(limiter, count)
        if not isinstance(found, list):
            return found
        jobs: list[ProcessableMessage[Any]] = []
        failure: BaseException | None = None
        for fields in found:
            if failure is not None:
                # The books failed on an earlier winner: this one goes back untouched.
                await self._give_back(limiter, fields[0].decode(), fields[5].decode())
                continue
            try:
                jobs.append(await self._open(limiter, capacity, fields))
            except BaseException as error:
                failure = error
        if failure is not None:
            if not jobs:
                raise failure
            _LOGGER.error("a global winner could not be handed out: %r", failure)
        return jobs

    async def _winners(self, limiter: RedisThrottle, count: int) -> list[list[Any]] | float | None:
        """One dispatch call for up to ``count`` winners: each winner's fields as the script
        returned them (leased and reserved, not yet in the dispatcher's books); or the seconds
        until the first winner fits; or None."""
        capacity = float(limiter.burst_tpm or limiter.tpm)
        if self._dispatch_script == "score_dispatch" and not self._score_announced:
            # The score policy dispatches from this queue: every script keeps its index from now
            # on, and no fair_priority dispatch drops it (lua/score_start.lua).
            await self._storage._run("score_start")
            self._score_announced = True
        reply = await self._dispatch(limiter, count, capacity)
        if len(reply) == 3 and reply[2] == b"unindexed":
            # A queue from before the ranking index: its messages are indexed, then it is asked
            # again (once: a queue found unindexed again is left to the next call).
            await self._index()
            reply = await self._dispatch(limiter, count, capacity)
            if len(reply) == 3 and reply[2] == b"unindexed":
                return None
        if len(reply) < 9:
            if len(reply) == 3:
                # The held winner's refusal (score_dispatch.lua): the binding limit's metrics.
                self._core.limiter_refused(reply[2].decode())
            wait = reply[1]
            return float(wait) / 1_000_000 if wait else None
        return _winner_fields(reply)

    async def _dispatch(self, limiter: RedisThrottle, count: int, capacity: float) -> Any:
        storage = self._storage
        timeout = self._timeout
        sent = host_microseconds(storage._host_time())
        winners = max(1, min(count, _MOST_WINNERS))
        if self._dispatch_script == "score_dispatch":
            arguments: tuple[Any, ...] = (
                winners,
                round(timeout * 1_000_000),
                repr(timeout),
                repr(capacity),
                *self._score_args,
            )
        else:
            arguments = (
                winners,
                round(timeout * 1_000_000),
                repr(timeout),
                *self._fair_args,
                repr(capacity),
                *self._weights,
            )
        reply = await self._run(self._dispatch_script, limiter, arguments)
        storage._clock_offset.observe(sent, host_microseconds(storage._host_time()), int(reply[0]))
        return reply

    def _start_recovery(self, limiter: RedisThrottle, keys: list[Any], arguments: list[Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._recover(limiter, keys, arguments))
        self._recoveries.add(task)
        task.add_done_callback(self._recoveries.discard)

    async def _recover(self, limiter: RedisThrottle, keys: list[Any], arguments: list[Any]) -> None:
        """Gives back the winners of a dispatch cancelled or timed out: its call sent again (a
        run it had made answers as that run did; one it had not made runs now), each winner
        released with its reservation and charge. On failure they come back after their
        visibility timeout."""
        try:
            reply = await self._storage._connection.run(_script(self._dispatch_script), keys, arguments)
            if len(reply) >= 9:
                for fields in _winner_fields(reply):
                    await self._give_back(limiter, fields[0].decode(), fields[5].decode(), "release")
        except Exception as exc:  # StorageError, or the client's: left to the visibility timeout
            _LOGGER.warning("the winners of a lost dispatch come back after their visibility: %r", exc)

    async def _index(self) -> None:
        """Puts the messages of a queue stored before the ranking index existed into it
        (``lua/index_scan.lua``, ``lua/index_fill.lua``), a few hundred per call, then marks the
        queue indexed. An unreadable message is indexed with no tenant and no estimate: the
        dispatch that picks it gives it back as any unreadable message."""
        storage = self._storage
        cursor = b"0"
        while True:
            found = await storage._run("index_scan", cursor)
            cursor = found[0]
            fields: list[Any] = []
            for i in range(1, len(found), 2):
                try:
                    index = _index_fields(storage._decode(found[i + 1]))
                except StorageError:
                    index = (b"", 0, -1, -1, -1, "-1")
                fields += (found[i], *index)
            done = cursor in (b"0", 0, "0")
            await storage._run("index_fill", "1" if done else "0", *fields)
            if done:
                break
        if self._dispatch_script != "score_dispatch":
            # A fair_priority process leaves the score policy's index alone: announcing itself
            # would have every script keep that index for good on a queue the score policy may
            # never serve (its own first dispatch fills it).
            return
        # The score policy's index (lua/score_fill.lua), for a queue stored before it existed or
        # one whose fair_priority dispatches dropped it: kept by every script from here on
        # (lua/score_start.lua), so the scan misses nothing that moves meanwhile.
        await storage._run("score_start")
        cursor = b"0"
        while True:
            cursor = await storage._run("score_fill", cursor)
            if cursor in (b"0", 0, "0"):
                return

    async def _open(
        self, limiter: RedisThrottle, capacity: float, fields: list[Any]
    ) -> ProcessableMessage[Any]:
        """The job of one winner the script leased and reserved: its delivery opened in the
        dispatcher's books (they take it as the buffer's only message), handed out."""
        storage, core = self._storage, self._core
        member, mid, count, enqueued, first, token, body = fields[:7]
        receive_count = int(count)
        member_text, token_text = member.decode(), token.decode()
        handle = f"{member_text}.{receive_count}.{token_text}"
        key = None
        try:
            request = storage._decode(body)
            message: QueueMessage[Any] = storage._message(
                request, mid, receive_count, enqueued, first, handle
            )
            key = f"{request.id}#{receive_count}"
            # Not withdrawn when the dispatch read it (global_dispatch.lua's flags; the score
            # policy's dispatch reads none).
            self._keys[key] = len(fields) > 7 and fields[7] == b"0"
            self._leases[key] = (handle, member_text, token_text)
            if (
                self._dispatch_script == "score_dispatch"
                and request.token_info.estimated <= limiter.token_capacity
            ):
                # The score it was ranked with (score_dispatch.lua): A is the smallest capacity of
                # the token limits. One above it (fitting an input or output limit by its parts)
                # keeps the whole-estimate capacity, which the books need to take it.
                capacity = float(limiter.token_capacity)
            # Into the buffer, taken and handed out, in one call.
            found, handed_out = core.open_winner(
                message, self._timeout, limiter, capacity, float(limiter.request_capacity)
            )
        except BaseException:
            # Unreadable, or the books refused it: its lease and reservation go back (an unreadable
            # one to the dead-letter queue when there is one, else it stays leased until its
            # visibility runs out).
            if key is not None:
                self._keys.pop(key, None)
                self._leases.pop(key, None)
            await self._give_back(limiter, member_text, token_text)
            raise
        if handed_out:
            assert type(found) is ProcessableMessage
            return found
        # Not expected: the books took another delivery, or none. Both go back.
        if type(found) is ProcessableMessage:
            core.revoke(found, False, False)
        self._keys.pop(key, None)
        self._leases.pop(key, None)
        await self._give_back(limiter, member_text, token_text)
        raise StorageError(f"the dispatcher's books did not take the global winner {key!r}")

    async def _give_back(self, limiter: RedisThrottle, member: str, token: str, step: str = "") -> None:
        """Ends a delivery no handler got, with its reservation and charge: by ``step``, else
        (an unreadable one) to the dead-letter queue, or leased until its visibility runs out."""
        storage = self._storage
        step = step or ("dead_letter" if storage.dead_letter is not None else "visibility")
        with contextlib.suppress(StorageError):
            await self._marked(
                limiter, (step, member, token, round(self._timeout * 1_000_000), "release", "", 0, "", "", "")
            )

    def claimed(self, job: ProcessableMessage[Any]) -> bool:
        """Whether ``job``'s dispatch found that nobody had withdrawn its request: a `Worker`
        need not ask the outcome relay (it asks for the others, as for any job). Asked once."""
        key = job._key
        if key is None or not self._keys.get(key, False):
            return False
        self._keys[key] = False
        return True

    def owns(self, job: ProcessableMessage[Any]) -> bool:
        """Whether ``job`` is a delivery this global choice handed out (and not marked yet)."""
        return job._key in self._keys

    def handles(self, plan: Plan) -> bool:
        """Whether ``plan`` is the mark of a delivery this global choice handed out, with a store
        step and its limiter (then `mark` runs it whole in one script)."""
        return plan.key in self._keys and plan.store is not None and isinstance(plan.limiter, RedisThrottle)

    async def mark(self, plan: Plan) -> bool:
        """Runs ``plan`` in one script: the store's step, the limiter's call, the charge's
        correction. Returns whether the receipt handle was stale."""
        stored, limited = await self._marked(plan.limiter, self._mark_fields(plan))
        return self._mark_landed(plan, stored, limited)

    def settled(self, plan: Plan) -> asyncio.Future[None]:
        """`mark` without a task of its own: ``plan`` (`handles` it) joins the next mark call,
        which is made even if the caller is cancelled; the call's sender tells the dispatcher's
        books its reply (`_tell_books`) and then the future returned (None, or the books' error:
        `ReceiptHandleError` when stale, `StorageError` when the mark or its call failed, the
        delivery then markable again)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._marks.append(_Mark(plan.limiter, self._mark_fields(plan), future, plan))
        if self._sender is None:
            self._start_sender(loop)
        return future

    def _mark_fields(self, plan: Plan) -> tuple[Any, ...]:
        """The ten arguments of ``plan``'s mark in ``lua/global_mark.lua``."""
        limiter: RedisThrottle = plan.limiter
        key, handle = plan.key, plan.message.attributes.receipt_handle
        lease = self._leases.get(key)
        # The handle's parts as `_open` had them, rather than parsed again.
        if lease is not None and lease[0] == handle:
            member, token = lease[1], lease[2]
        else:
            member, token = self._storage._handle(handle)
        # The actual input and output counts, when the mark gave them: each limit its own.
        parts = plan.parts
        return (
            plan.store,
            member,
            token,
            round(plan.seconds * 1_000_000),
            plan.limiter_call or "",
            key,
            int(plan.tokens),
            limiter.adjustment_failure_strategy,
            *(("", "") if parts is None else (parts[0], parts[1])),
        )

    def _mark_landed(self, plan: Plan, stored: int, limited: Any) -> bool:
        """After ``plan``'s mark call answered (the store's reply ``stored``, the limiter's
        ``limited``): the delivery forgotten here, a refused correction logged. Whether the
        receipt handle was stale."""
        key = plan.key
        self._keys.pop(key, None)
        self._leases.pop(key, None)
        if plan.limiter_call == "adjust" and isinstance(limited, list) and limited and limited[0] != b"ok":
            _LOGGER.warning(
                "rate limiter failed to correct request %r (%s); the message is settled",
                plan.request_id,
                limited[0].decode(),
            )
        return stored == 0

    def _tell_books(self, item: _Mark, error: BaseException | None, reply: tuple[int, Any] | None) -> None:
        """The end of a job's mark (``item.plan``) in the dispatcher's books, then its caller's
        future: landed (``reply``) or failed (``error``; a cancellation cancels the future)."""
        plan, future, core = item.plan, item.future, self._core
        assert plan is not None
        assert not item.told
        item.told = True
        outcome: BaseException | None = error
        try:
            if reply is None:
                core.store_replied(plan.delivery, "failed")  # markable again; nothing else done
            else:
                stale = self._mark_landed(plan, *reply)
                core.finish(plan, core.store_replied(plan.delivery, "stale" if stale else "landed"))
        except Exception as exc:  # the books' ReceiptHandleError (stale), or a log that failed
            outcome = exc
        if future.done():
            return  # its caller was cancelled: the mark was made all the same
        if outcome is None:
            future.set_result(None)
        elif isinstance(outcome, asyncio.CancelledError):
            future.cancel()
        else:
            future.set_exception(outcome)
            future.exception()  # retrieved: a caller that did not wait is not warned about it

    async def _marked(self, limiter: RedisThrottle, fields: tuple[Any, ...]) -> tuple[int, Any]:
        """One mark (``fields``: its ten arguments of ``lua/global_mark.lua``), sent with the
        others made in the same turn of the event loop, or while the previous call was on its
        way, in one script call: the store's reply (1, or 0 when the token was stale) and the
        limiter's. A mark that fails in the script fails alone (`StorageError`); a call that
        fails (the connection) fails each of its marks, whose leases then run out as any lease
        does. Cancelled before its call is sent, the mark is left out of it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, Any]] = loop.create_future()
        self._marks.append(_Mark(limiter, fields, future))
        if self._sender is None:
            self._start_sender(loop)
        result: tuple[int, Any] = await future
        return result

    def _start_sender(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sender = sender = loop.create_task(self._send_marks())
        self._track(sender)
        sender.add_done_callback(self._sender_ended)

    def _sender_ended(self, sender: asyncio.Task[None]) -> None:
        """A sender cancelled before it started never ran its ``finally``: its marks end here."""
        if self._sender is sender:
            self._sender = None
            self._drop_marks([], self._marks)
            self._marks = []

    def _drop_marks(self, *lists: list[_Mark]) -> None:
        """The end of marks no call will send: a job's (`settled`) told to the books as
        cancelled (markable again), the others' callers cancelled."""
        cancelled = asyncio.CancelledError()
        for marks in lists:
            for item in marks:
                if item.plan is None:
                    item.future.cancel()
                elif not item.told:
                    self._tell_books(item, cancelled, None)

    async def _send_marks(self) -> None:
        """Sends the marks waiting, up to ``_MOST_MARKS`` per call (one call per limiter), the
        calls of one round together; then those that came meanwhile, until none waits."""
        waiting: list[_Mark] = []
        try:
            await asyncio.sleep(0)  # the marks of this turn of the event loop join
            while self._marks:
                waiting, self._marks = self._marks, []
                groups: dict[int, list[_Mark]] = {}
                for item in waiting:
                    # Left out: a mark whose caller was cancelled before the call was sent,
                    # unless it is a job's (`settled`), which is made all the same.
                    if item.plan is not None or not item.future.done():
                        groups.setdefault(id(item.limiter), []).append(item)
                await _together(
                    [
                        self._send_batch(group[i : i + _MOST_MARKS])
                        for group in groups.values()
                        for i in range(0, len(group), _MOST_MARKS)
                    ]
                )
        finally:
            self._sender = None
            # Left by a cancelled sender: the marks nothing sent, and those of a call cancelled
            # before it started.
            self._drop_marks(waiting, self._marks)
            self._marks = []

    async def _send_batch(self, batch: list[_Mark]) -> None:
        """One script call for ``batch`` (marks of one limiter); each caller gets its own
        outcome, a job's mark (`settled`) once the books have it."""
        tail: list[Any] = []
        for item in batch:
            tail += item.fields
        try:
            reply = await self._run("global_mark", batch[0].limiter, (len(batch),), tuple(tail))
        except BaseException as error:
            for item in batch:
                if isinstance(error, asyncio.CancelledError):
                    own: BaseException = error
                else:
                    own = StorageError(str(error))  # each caller its own exception
                    own.__cause__ = error.__cause__
                if item.plan is not None:
                    self._tell_books(item, own, None)
                elif not item.future.done():
                    if isinstance(own, asyncio.CancelledError):
                        item.future.cancel()
                    else:
                        item.future.set_exception(own)
            if not isinstance(error, Exception):
                raise
            return
        for i, item in enumerate(batch):
            stored, limited = int(reply[1 + 2 * i]), reply[2 + 2 * i]
            failed = None
            if stored < 0:
                text = limited.decode("utf-8", "replace") if isinstance(limited, bytes) else str(limited)
                failed = StorageError(f"Redis global_mark on queue {self._storage.queue!r} failed: {text}")
            if item.plan is not None:
                self._tell_books(item, failed, None if failed else (stored, limited))
            elif item.future.done():
                continue  # its caller was cancelled while the call was on its way
            elif failed is not None:
                item.future.set_exception(failed)
            else:
                item.future.set_result((stored, limited))
