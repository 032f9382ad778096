"""Budgets (providers/budget.py) on an in-memory database: reservations against the world's money cap and call
limits, the daily cap and its rollback when the world refuses, settling (refunds, and a settle that fails),
and the messages an operator reads. The same ledger runs on the real database in tests/integration."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest
from fakedb import FakeDatabase
from pymongo.errors import AutoReconnect, DuplicateKeyError
from structlog.testing import capture_logs

from ai_worker.errors import BudgetExceeded
from ai_worker.providers.budget import MongoBudget, Reservation, Unlimited
from ai_worker.providers.history import CallContext

WORLD = "world-1"


def world_db(*, status: str = "in_progress", cap: float | None = 1.0, llm_limit: int | None = 10,
             image_limit: int | None = 10, **extra: Any) -> FakeDatabase:
    db = FakeDatabase()
    db["world_generation_status"].docs[WORLD] = {
        "_id": WORLD, "status": status, "budget_usd": cap, "budget_committed_usd": 0.0,
        "api_call_limits_LLM": llm_limit, "api_call_limits_images": image_limit, "api_calls_reserved_LLM": 0,
        "api_calls_reserved_images": 0, **extra}
    return db


def world(db: FakeDatabase) -> dict[str, Any]:
    return db["world_generation_status"].docs[WORLD]


def daily(db: FakeDatabase) -> dict[str, Any]:
    (doc,) = db["budgets"].docs.values()
    return doc


CALL = CallContext(task_id="t1", world_id=WORLD, request_type="post")
NO_WORLD = CallContext(task_id=None, world_id=None, request_type="tool")


async def test_unlimited_grants_everything() -> None:
    budget = Unlimited()
    reservation = await budget.reserve(CALL, "llm", 123.0)
    assert reservation == Reservation(world_id=None, day=None, amount=123.0)
    assert await budget.settle(reservation, 1.0) is None


async def test_reservation_counts_money_and_one_call_of_its_kind() -> None:
    db = world_db()
    budget = MongoBudget(db, daily_cap_usd=0)
    reservation = await budget.reserve(CALL, "llm", 0.25)
    assert reservation == Reservation(world_id=WORLD, day=None, amount=0.25)
    assert world(db)["budget_committed_usd"] == 0.25
    assert world(db)["api_calls_reserved_LLM"] == 1 and world(db)["api_calls_reserved_images"] == 0
    await budget.reserve(CALL, "image", 0.5)
    assert world(db)["budget_committed_usd"] == 0.75
    assert world(db)["api_calls_reserved_LLM"] == 1 and world(db)["api_calls_reserved_images"] == 1
    assert db["budgets"].calls == [], "no daily ledger without a daily cap"


async def test_money_cap_allows_exactly_the_cap_and_refuses_past_it() -> None:
    db = world_db(cap=1.0)
    budget = MongoBudget(db, daily_cap_usd=0)
    await budget.reserve(CALL, "llm", 0.75)
    await budget.reserve(CALL, "llm", 0.25)  # lands exactly on the cap
    with pytest.raises(BudgetExceeded) as refused:
        await budget.reserve(CALL, "llm", 0.125)
    assert str(refused.value).startswith("world budget of $1.0000 would be exceeded: $1.0000 committed, this call "
                                         "may cost up to $0.1250. To give worlds more: ")
    assert "retry WORLD_ID --budget-usd" in str(refused.value)
    assert world(db)["budget_committed_usd"] == 1.0 and world(db)["api_calls_reserved_LLM"] == 2


async def test_call_limit_is_per_kind_and_exact() -> None:
    db = world_db(cap=None, llm_limit=2, image_limit=1)
    budget = MongoBudget(db, daily_cap_usd=0)
    await budget.reserve(CALL, "llm", 0.0)
    await budget.reserve(CALL, "llm", 0.0)
    with pytest.raises(BudgetExceeded, match=r"^world call limit reached: 2 llm calls$"):
        await budget.reserve(CALL, "llm", 0.0)
    await budget.reserve(CALL, "image", 0.0)
    with pytest.raises(BudgetExceeded, match=r"^world call limit reached: 1 image calls$"):
        await budget.reserve(CALL, "image", 0.0)


async def test_no_cap_and_no_limit_grant_everything() -> None:
    db = world_db(cap=None, llm_limit=None)
    budget = MongoBudget(db, daily_cap_usd=0)
    for _ in range(20):
        await budget.reserve(CALL, "llm", 5.0)
    assert world(db)["budget_committed_usd"] == 100.0 and world(db)["api_calls_reserved_LLM"] == 20


@pytest.mark.parametrize("status", ["completed", "failed"])
async def test_a_finished_world_pays_for_nothing(status: str) -> None:
    db = world_db(status=status)
    with pytest.raises(BudgetExceeded, match=rf"^world {WORLD} is {status}: no more paid calls$"):
        await MongoBudget(db, daily_cap_usd=0).reserve(CALL, "llm", 0.0)
    assert world(db)["api_calls_reserved_LLM"] == 0


async def test_a_pending_world_pays() -> None:
    db = world_db(status="pending")
    await MongoBudget(db, daily_cap_usd=0).reserve(CALL, "llm", 0.5)
    assert world(db)["budget_committed_usd"] == 0.5


async def test_negative_or_odd_amounts_reserve_nothing_below_zero() -> None:
    db = world_db()
    reservation = await MongoBudget(db, daily_cap_usd=0).reserve(CALL, "llm", -3)
    assert reservation.amount == 0.0 and isinstance(reservation.amount, float)
    assert world(db)["budget_committed_usd"] == 0.0 and world(db)["api_calls_reserved_LLM"] == 1


async def test_calls_outside_a_known_world_are_not_checked() -> None:
    db = world_db(cap=0.0)
    budget = MongoBudget(db, daily_cap_usd=0)
    assert (await budget.reserve(NO_WORLD, "llm", 9.0)).world_id is None
    other = CallContext(task_id="t", world_id="not-started-by-us", request_type="x")
    assert (await budget.reserve(other, "llm", 9.0)).world_id == "not-started-by-us"
    assert world(db)["budget_committed_usd"] == 0.0


async def test_daily_cap_is_shared_and_exact() -> None:
    db = FakeDatabase()
    budget = MongoBudget(db, daily_cap_usd=1.0)
    first = await budget.reserve(NO_WORLD, "image", 0.5)
    assert first.day is not None and first.day.startswith("daily:") and len(first.day) == len("daily:2025-01-01")
    await MongoBudget(db, daily_cap_usd=1.0).reserve(NO_WORLD, "image", 0.5)  # another worker, same day
    assert daily(db)["committed_usd"] == 1.0
    with pytest.raises(BudgetExceeded, match=r"^daily budget of \$1\.00 would be exceeded \(DAILY_BUDGET_USD\)$"):
        await budget.reserve(NO_WORLD, "image", 0.25)
    assert daily(db)["committed_usd"] == 1.0


async def test_daily_reservation_is_rolled_back_when_the_world_refuses() -> None:
    db = world_db(cap=0.5)
    budget = MongoBudget(db, daily_cap_usd=10.0)
    await budget.reserve(CALL, "llm", 0.5)
    assert daily(db)["committed_usd"] == 0.5
    with pytest.raises(BudgetExceeded, match="world budget"):
        await budget.reserve(CALL, "llm", 0.25)
    assert daily(db)["committed_usd"] == 0.5, "the world refused: the daily reservation is given back"


async def test_settle_refunds_or_charges_the_difference() -> None:
    db = world_db(cap=1.0)
    budget = MongoBudget(db, daily_cap_usd=10.0)
    reservation = await budget.reserve(CALL, "llm", 0.5)
    await budget.settle(reservation, 0.125)
    assert world(db)["budget_committed_usd"] == 0.125 and daily(db)["committed_usd"] == 0.125
    more = await budget.reserve(CALL, "image", 0.25)
    await budget.settle(more, 0.5)  # the call cost more than reserved
    assert world(db)["budget_committed_usd"] == 0.625 and daily(db)["committed_usd"] == 0.625
    failed = await budget.reserve(CALL, "llm", 0.25)
    await budget.settle(failed, -1.0)  # a failed call costs nothing: never a negative cost
    assert world(db)["budget_committed_usd"] == 0.625 and daily(db)["committed_usd"] == 0.625


async def test_settle_without_a_difference_only_counts_the_call() -> None:
    db = world_db()
    budget = MongoBudget(db, daily_cap_usd=10.0)
    reservation = await budget.reserve(CALL, "llm", 0.25)
    worlds, budgets = len(db["world_generation_status"].calls), len(db["budgets"].calls)
    await budget.settle(reservation, 0.25)
    # One write: the call and its cost counted on the world, in the update that would settle a difference.
    assert len(db["world_generation_status"].calls) == worlds + 1 and len(db["budgets"].calls) == budgets
    assert (world(db)["api_calls_made_LLM"], world(db)["llm_cost_total"]) == (1, 0.25)
    # A call that never reached the provider (not in the history) is not counted: nothing to write.
    reservation = await budget.reserve(CALL, "llm", 0.25)
    worlds = len(db["world_generation_status"].calls)
    await budget.settle(reservation, 0.25, counted=False)
    assert len(db["world_generation_status"].calls) == worlds


async def test_a_failed_settle_keeps_the_reservation_and_does_not_raise() -> None:
    db = world_db()
    budget = MongoBudget(db, daily_cap_usd=10.0)
    reservation = await budget.reserve(CALL, "llm", 0.5)
    db["world_generation_status"].fail_next("update_one", AutoReconnect("connection refused"))
    with capture_logs() as logs:
        await budget.settle(reservation, 0.0)
    assert world(db)["budget_committed_usd"] == 0.5, "kept: spend is never under-counted"
    assert daily(db)["committed_usd"] == 0.5
    warned = [e for e in logs if e["event"] == "budget settle failed; reservation kept"]
    assert len(warned) == 1 and warned[0]["log_level"] == "warning" and "connection refused" in warned[0]["error"]


async def test_settle_of_a_reservation_outside_worlds_and_days_is_a_no_op() -> None:
    db = FakeDatabase()
    await MongoBudget(db, daily_cap_usd=0).settle(Reservation(world_id=None, day=None, amount=1.0), 0.0)
    assert all(c.calls == [] for c in db.collections.values())


async def test_a_worker_sees_any_number_of_worlds() -> None:
    """The per-world cap cache is bounded: past its size, old entries make room (no reservation fails)."""
    db = FakeDatabase()
    budget = MongoBudget(db, daily_cap_usd=0)
    for i in range(4100):
        db["world_generation_status"].docs[f"w{i}"] = {
            "_id": f"w{i}", "status": "in_progress", "budget_usd": 1.0, "budget_committed_usd": 0.0,
            "api_call_limits_LLM": 5, "api_call_limits_images": 5, "api_calls_reserved_LLM": 0,
            "api_calls_reserved_images": 0}
        await budget.reserve(CallContext(task_id="t", world_id=f"w{i}", request_type="x"), "llm", 0.5)
    await budget.reserve(CallContext(task_id="t", world_id="w0", request_type="x"), "llm", 0.5)
    assert db["world_generation_status"].docs["w0"]["budget_committed_usd"] == 1.0


async def test_refusal_messages_when_the_ledger_fields_are_missing() -> None:
    """A status document without the ledger fields (written by an older worker) still gets a readable refusal."""
    db = world_db(cap=None, llm_limit=0)
    del world(db)["api_calls_reserved_LLM"]
    with pytest.raises(BudgetExceeded, match=r"^world call limit reached: 0 llm calls$"):
        await MongoBudget(db, daily_cap_usd=0).reserve(CALL, "llm", 0.0)
    db = world_db(cap=0.5)
    del world(db)["budget_committed_usd"]
    with pytest.raises(BudgetExceeded) as refused:
        await MongoBudget(db, daily_cap_usd=0).reserve(CALL, "llm", 0.25)
    assert str(refused.value).startswith("world budget of $0.5000 would be exceeded: $0.0000 committed, this call "
                                         "may cost up to $0.2500. ")


@pytest.mark.parametrize("tz", ["Etc/GMT-14", "Etc/GMT+12"])  # between them, one local date differs from UTC's
async def test_the_daily_budget_is_keyed_by_the_utc_day(tz: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", tz)
    time.tzset()
    try:
        reservation = await MongoBudget(FakeDatabase(), daily_cap_usd=1.0).reserve(NO_WORLD, "llm", 0.1)
        assert reservation.day == "daily:" + datetime.now(UTC).strftime("%Y-%m-%d")
    finally:
        monkeypatch.undo()
        time.tzset()


async def test_two_workers_creating_the_days_ledger_at_once() -> None:
    """The loser of the race to create the day's document gets a duplicate key error and goes on."""
    db = FakeDatabase()
    db["budgets"].fail_next("update_one", DuplicateKeyError("E11000 duplicate key error"))
    db["budgets"].docs["daily:" + datetime.now(UTC).strftime("%Y-%m-%d")] = {
        "_id": "daily:" + datetime.now(UTC).strftime("%Y-%m-%d"), "committed_usd": 0.25}
    await MongoBudget(db, daily_cap_usd=1.0).reserve(NO_WORLD, "llm", 0.5)
    assert daily(db)["committed_usd"] == 0.75


def _refusals(kind: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("ai_worker_budget_refusals_total", {"kind": kind}) or 0.0


async def test_a_raised_cap_is_read_again_after_a_refusal_and_applies_in_full() -> None:
    db = world_db(cap=1.0, llm_limit=3)
    budget = MongoBudget(db, daily_cap_usd=0)
    await budget.reserve(CALL, "llm", 1.0)  # the caps are cached now
    with pytest.raises(BudgetExceeded, match="world budget"):
        await budget.reserve(CALL, "llm", 0.5)
    world(db)["budget_usd"] = 1.2  # an operator raised it, not enough for this call
    with pytest.raises(BudgetExceeded, match=r"world budget of \$1\.2000"):
        await budget.reserve(CALL, "llm", 0.5)
    world(db)["budget_usd"] = 2.0
    image = await budget.reserve(CALL, "image", 0.5)  # read again: granted, under the new cap
    assert image.kind == "image" and image.world_id == WORLD and image.amount == 0.5
    assert world(db)["budget_committed_usd"] == 1.5 and world(db)["api_calls_reserved_images"] == 1
    # Raising the money cap does not lift a call limit that is reached.
    await budget.reserve(CALL, "llm", 0.1)
    await budget.reserve(CALL, "llm", 0.1)
    world(db)["budget_usd"] = 5.0
    with pytest.raises(BudgetExceeded, match="world call limit reached: 3 llm calls"):
        await budget.reserve(CALL, "llm", 0.1)
    assert world(db)["api_calls_reserved_LLM"] == 3


async def test_a_world_gone_after_its_caps_were_cached_pays_for_nothing() -> None:
    db = world_db(cap=0.5)
    budget = MongoBudget(db, daily_cap_usd=0)
    await budget.reserve(CALL, "llm", 0.5)
    del db["world_generation_status"].docs[WORLD]
    with pytest.raises(BudgetExceeded, match="is None: no more paid calls"):
        await budget.reserve(CALL, "llm", 0.5)


async def test_each_refusal_is_counted_under_its_kind() -> None:
    budget = MongoBudget(world_db(cap=0.5, llm_limit=1), daily_cap_usd=1.0)
    before = {k: _refusals(k) for k in ("daily", "world_money", "world_calls", "world_not_live")}
    with pytest.raises(BudgetExceeded):
        await budget.reserve(CALL, "llm", 0.75)  # the world's money
    await budget.reserve(CALL, "llm", 0.25)
    with pytest.raises(BudgetExceeded):
        await budget.reserve(CALL, "llm", 0.1)  # the world's LLM calls
    with pytest.raises(BudgetExceeded):
        await budget.reserve(NO_WORLD, "llm", 0.9)  # the day's money (0.25 + 0.9 > 1.0)
    with pytest.raises(BudgetExceeded):
        await MongoBudget(world_db(status="completed"), daily_cap_usd=0).reserve(CALL, "llm", 0.1)
    after = {k: _refusals(k) - v for k, v in before.items()}
    assert after == {"daily": 1, "world_money": 1, "world_calls": 1, "world_not_live": 1}


async def test_an_uncounted_settle_still_refunds_the_difference() -> None:
    db = world_db()
    budget = MongoBudget(db, daily_cap_usd=0)
    reservation = await budget.reserve(CALL, "image", 0.5)
    await budget.settle(reservation, 0.0, counted=False)  # refused before reaching the provider
    assert world(db)["budget_committed_usd"] == 0.0
    assert world(db).get("api_calls_made_images", 0) == 0 and world(db).get("image_cost_total", 0) == 0


async def test_a_cap_raised_while_cached_is_read_again_within_the_same_call() -> None:
    db = world_db(cap=1.0)
    budget = MongoBudget(db, daily_cap_usd=0)
    await budget.reserve(CALL, "llm", 0.6)  # granted: the $1.00 cap is cached
    world(db)["budget_usd"] = 2.0
    await budget.reserve(CALL, "llm", 0.6)  # refused under the cached cap, granted under the one read again
    assert world(db)["budget_committed_usd"] == 1.2
