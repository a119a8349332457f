"""The engine of `llmqd demo`, driven step by step on simulated time (no web server)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_queue_dispatcher import FACTOR_NAMES, InvalidConfigError, Priority
from llm_queue_dispatcher.demo.engine import (
    MAX_BURST,
    MAX_PENDING,
    STRATEGIES,
    Controls,
    DemoEngine,
    ProviderModel,
)


async def _run(engine: DemoEngine, until: float, every: float = 0.5) -> None:
    at = engine.elapsed
    while at < until:
        at = min(until, at + every)
        await engine.step(at=at)


async def test_every_lane_gets_the_same_requests_and_completes_them() -> None:
    engine = DemoEngine(controls=Controls(failure_rate=0.0, arrival_rate=2.0))
    try:
        await _run(engine, 120.0)
        snapshot = await engine.snapshot()
        assert engine.arrived > 150
        for lane in snapshot["lanes"]:
            waiting = lane["pending"]["total"]
            assert lane["completed"]["total"] + lane["processing"]["total"] + waiting == engine.arrived
            assert lane["completed"]["total"] > 100
        assert [lane["name"] for lane in snapshot["lanes"]] == list(STRATEGIES)
    finally:
        await engine.close()


async def test_each_lane_dispatches_by_its_own_strategy_and_budget() -> None:
    # A mixed burst far above the RPM limit: the priority preset serves URGENT first.
    engine = DemoEngine(
        ["simple_priority", "throughput"],
        controls=Controls(rpm=30, tpm=1_000_000, arrival_rate=0.0, failure_rate=0.0),
    )
    try:
        await engine.burst(300)
        await _run(engine, 60.0)
        snapshot = await engine.snapshot()
        priority_first = snapshot["lanes"][0]
        assert priority_first["name"] == "simple_priority"
        # Every URGENT request went; HIGH ones still wait, so nothing NORMAL or LOW was sent.
        assert priority_first["pending"]["by_priority"][0] == 0
        assert priority_first["pending"]["by_priority"][1] > 0
        waits = priority_first["stats"]["waits"]
        assert waits["URGENT"][0] > 0
        assert waits["NORMAL"] == waits["LOW"] == [0.0, 0.0, 0.0]
        # Each lane has its own limiter: 30 requests of burst capacity plus 30 refilled in a minute.
        assert engine.lanes[0].limiter is not engine.lanes[1].limiter
        for lane in snapshot["lanes"]:
            dispatched = lane["completed"]["total"] + lane["processing"]["total"]
            assert dispatched == pytest.approx(60, abs=1)
    finally:
        await engine.close()


async def test_a_click_finds_the_score_breakdown_and_reason() -> None:
    engine = DemoEngine(["default", "fair"], controls=Controls(failure_rate=0.0))
    try:
        await engine.burst(40)
        await _run(engine, 30.0)
        snapshot = await engine.snapshot()
        for lane in snapshot["lanes"]:
            chip = lane["completed"]["items"][0]
            detail = engine.request_detail(lane["name"], chip["id"])
            assert detail is not None
            assert detail["state"] == "completed"
            assert list(detail["score"]["breakdown"]) == list(FACTOR_NAMES)
            assert detail["score"]["total"] == pytest.approx(sum(detail["score"]["breakdown"].values()))
            assert detail["reason"].startswith(f"score {detail['score']['total']:.3f}")
            assert detail["actual_tokens"] > 0
            processing = lane["processing"]["items"]
            if processing:
                live = engine.request_detail(lane["name"], processing[0]["id"])
                assert live is not None
                assert live["state"] == "processing"
        assert engine.request_detail("default", "no-such-request") is None
        assert engine.request_detail("no-such-lane", chip["id"]) is None
    finally:
        await engine.close()


async def test_a_limit_change_builds_a_new_limiter_that_keeps_what_was_used() -> None:
    engine = DemoEngine(["default"], controls=Controls(rpm=600, tpm=100_000, arrival_rate=0.0))
    try:
        await engine.burst(20)
        await engine.step(at=0.0)
        lane = engine.lanes[0]
        before = lane.limiter
        used = 100_000 - before.get_metrics().tpm.available
        requests_used = 600 - before.get_metrics().rpm.available
        assert used > 0
        assert requests_used > 0
        engine.set_controls({"tpm": 50_000})
        after = lane.limiter
        assert after is not before
        metrics = after.get_metrics()
        assert metrics.tpm.limit == 50_000
        assert metrics.rpm.limit == 600
        assert metrics.tpm.available == pytest.approx(max(0.0, 50_000 - used))
        assert metrics.rpm.available == pytest.approx(600 - requests_used)
        assert after.clock is engine.clock
        # Raising it again: the used part still counts.
        engine.set_controls({"tpm": 200_000})
        assert lane.limiter.get_metrics().tpm.available == pytest.approx(200_000 - min(used, 50_000))
    finally:
        await engine.close()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rpm": 0.5}, "rpm must be within \\[1, "),
        ({"tpm": 0.5}, "tpm must be within \\[1, "),
        ({"tpm": 15_999}, "tpm must be at least 16,000"),
    ],
)
async def test_a_limit_that_could_never_admit_a_request_is_refused(
    changes: dict[str, object], message: str
) -> None:
    engine = DemoEngine(["default"])
    try:
        before, limiter = engine.controls, engine.lanes[0].limiter
        with pytest.raises(InvalidConfigError, match=message):
            engine.set_controls(changes)
        assert (engine.controls, engine.lanes[0].limiter) == (before, limiter)
        # The largest request the workload sends is what the TPM must hold at least.
        assert engine.describe()["provider"]["largest_request"] == ProviderModel().token_max
        engine.set_controls({"tpm": ProviderModel().token_max, "rpm": 1})
    finally:
        await engine.close()
    with pytest.raises(InvalidConfigError, match="tpm must be at least 2,000"):
        DemoEngine(provider=ProviderModel(token_max=2_000), controls=Controls(tpm=1_999))


async def test_the_tokens_granted_per_minute_stay_within_what_the_bucket_allows() -> None:
    engine = DemoEngine(["default"], controls=Controls(rpm=600, tpm=60_000, arrival_rate=0.0))
    try:
        await engine.burst(400)
        available: dict[float, float] = {0.0: 60_000.0}  # the token bucket starts full
        first_minute = later = 0
        at = 0.0
        while at < 200.0:
            at += 1.0
            await engine.step(at=at)
            snapshot = await engine.snapshot()
            stats = snapshot["lanes"][0]["stats"]
            granted = stats["granted_per_minute"]
            available[at] = stats["tpm_available"]
            # Net of refunds, a minute takes at most what the bucket held a minute earlier plus a
            # minute of refill (and what calls used beyond their estimates).
            assert granted <= available[max(0.0, at - 60.0)] + 60_000 * 1.1, at
            point = engine.chart_point(snapshot)
            assert (point["tpm_limit"], point["tpm_ceiling"]) == (60_000, 120_000)
            if at <= 60.0:
                first_minute = max(first_minute, granted)
            elif at >= 120.0:
                later = max(later, granted)
        # The bucket starts full: the first minute takes more than the TPM (saved budget), below
        # capacity + TPM; once it is spent, a backlog runs at the TPM, plus at most what the
        # bucket kept back meanwhile: the URGENT reserve (a quarter of the capacity at most),
        # spent once the backlog clears.
        assert 60_000 < first_minute <= 120_000
        assert 50_000 < later <= 60_000 * 1.05 + 60_000 * 0.25
        assert 0.75 <= stats["actual_to_estimate"] <= 1.1  # the provider model's estimation error
    finally:
        await engine.close()


async def test_failed_attempts_are_retried() -> None:
    engine = DemoEngine(["default"], controls=Controls(arrival_rate=0.0, failure_rate=0.5))
    try:
        await engine.burst(50)
        await _run(engine, 120.0)
        lane = engine.lanes[0]
        assert lane.failed_attempts > 0
        assert any(
            detail["attempt"] > 1 and detail["state"] == "completed" for detail in lane.recent.values()
        )
    finally:
        await engine.close()


async def test_a_big_burst_is_shown_as_counts_and_a_head() -> None:
    engine = DemoEngine()
    try:
        await engine.burst(10_000)
        await engine.step(at=1.0)
        snapshot = await engine.snapshot()
        for lane in snapshot["lanes"]:
            assert (
                lane["pending"]["total"] + lane["processing"]["total"] + lane["completed"]["total"] >= 10_000
            )
            assert len(lane["pending"]["head"]) <= 12
            assert len(lane["processing"]["items"]) <= 12
            # The head is in store order: URGENT first.
            head_priorities = [chip["p"] for chip in lane["pending"]["head"]]
            assert head_priorities == sorted(head_priorities)
        assert len(json.dumps(snapshot)) < 30_000
    finally:
        await engine.close()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rpm": -1}, "rpm"),
        ({"rpm": 0}, "rpm"),
        ({"rpm": 10**400}, "rpm"),
        ({"tpm": [60_000]}, "tpm"),
        ({"tpm": {"value": 60_000}}, "tpm"),
        ({"tpm": math.nan}, "tpm"),
        ({"tpm": math.inf}, "tpm"),
        ({"tpm": 1e12}, "tpm"),
        ({"tpm": "60000"}, "tpm"),
        ({"tpm": None}, "tpm"),
        ({"rpm": True}, "rpm"),
        ({"arrival_rate": -0.5}, "arrival_rate"),
        ({"arrival_rate": 51}, "arrival_rate"),
        ({"priority_mix": [1, 2, 3]}, "priority_mix"),
        ({"priority_mix": [0, 0, 0, 0]}, "priority_mix"),
        ({"priority_mix": [1, -1, 1, 1]}, r"priority_mix\[1\]"),
        ({"priority_mix": "1,2,3,4"}, "priority_mix"),
        ({"tenants": 0}, "tenants"),
        ({"tenants": 13}, "tenants"),
        ({"tenants": 2.5}, "tenants"),
        ({"failure_rate": 1.0}, "failure_rate"),
        ({"speed": 2}, "unknown control"),
        ({"rpm": 100, "tpm": -1}, "tpm"),
    ],
)
async def test_bad_controls_are_refused_and_change_nothing(changes: dict[str, object], message: str) -> None:
    engine = DemoEngine(["default"])
    try:
        before = engine.controls
        limiter = engine.lanes[0].limiter
        with pytest.raises(InvalidConfigError, match=message):
            engine.set_controls(changes)
        assert engine.controls is before
        assert engine.lanes[0].limiter is limiter
    finally:
        await engine.close()


async def test_good_controls_apply_and_are_normalised() -> None:
    engine = DemoEngine(["default"])
    try:
        controls = engine.set_controls({"priority_mix": [1, 0, 0, 0], "tenants": 5.0, "arrival_rate": 0})
        assert controls.priority_mix == (1.0, 0.0, 0.0, 0.0)
        assert controls.tenants == 5
        await engine.burst(30)
        snapshot = await engine.snapshot()
        assert snapshot["lanes"][0]["pending"]["by_priority"] == [30, 0, 0, 0]
        await engine.step(at=100.0)
        assert engine.arrived == 30  # arrival rate 0: nothing arrives by itself
    finally:
        await engine.close()


@pytest.mark.parametrize(
    ("size", "priority", "message"),
    [
        (0, None, "size"),
        (-5, None, "size"),
        (1.5, None, "size"),
        (MAX_BURST + 1, None, "size"),
        ("100", None, "size"),
        (math.nan, None, "size"),
        (True, None, "size"),
        (10, 7, "priority"),
        (10, "SOON", "priority"),
    ],
)
async def test_bad_bursts_are_refused(size: object, priority: object, message: str) -> None:
    engine = DemoEngine(["default"], controls=Controls(arrival_rate=0.0))
    try:
        with pytest.raises(InvalidConfigError, match=message):
            await engine.burst(size, priority)
        assert engine.arrived == 0
    finally:
        await engine.close()


async def test_a_burst_of_one_priority_and_the_pending_cap() -> None:
    engine = DemoEngine(["default"], controls=Controls(arrival_rate=0.0))
    try:
        assert await engine.burst(15, "high") == 15
        snapshot = await engine.snapshot()
        assert snapshot["lanes"][0]["pending"]["by_priority"] == [0, 15, 0, 0]
        for _ in range(MAX_PENDING // MAX_BURST - 1):
            await engine.burst(MAX_BURST, Priority.LOW)
        with pytest.raises(InvalidConfigError, match="would exceed"):
            await engine.burst(MAX_BURST)
    finally:
        await engine.close()


def test_bad_engine_arguments() -> None:
    with pytest.raises(InvalidConfigError, match="unknown strategy"):
        DemoEngine(["nope"])
    with pytest.raises(InvalidConfigError, match="at least one"):
        DemoEngine([])
    with pytest.raises(InvalidConfigError, match="repeat"):
        DemoEngine(["default", "default"])
    for speed in (0, -1, math.nan, 101):
        with pytest.raises(InvalidConfigError, match="speed"):
            DemoEngine(speed=speed)


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**4000), max_value=10**4000)
    | st.floats()
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(
    field=st.sampled_from(["rpm", "tpm", "arrival_rate", "priority_mix", "tenants", "failure_rate", "other"]),
    value=_JSON,
)
def test_any_json_value_for_a_control_is_applied_or_refused_with_the_control_named(
    field: str, value: object
) -> None:
    engine = DemoEngine(["default"], controls=Controls(arrival_rate=0.0))
    before = engine.controls
    try:
        engine.set_controls({field: value})
    except InvalidConfigError as error:
        message = str(error)
        assert field in message
        assert len(message) < 200
        assert engine.controls is before
