"""Budgets reserved before the call, on the real database and with a worker process on real servers."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from support import WorkerEnv, mongo, wait_world

from ai_worker.devstack.stack import StackInfo
from ai_worker.errors import BudgetExceeded
from ai_worker.jobs import build_registry
from ai_worker.providers.budget import MongoBudget
from ai_worker.providers.history import CallContext

pytestmark = pytest.mark.integration



async def _world(db: Any, *, cap: float, llm_limit: int = 1000) -> str:
    world_id = str(uuid.uuid4())
    await db["world_generation_status"].insert_one({
        "_id": world_id, "status": "in_progress", "budget_usd": cap, "budget_committed_usd": 0.0,
        "api_call_limits_LLM": llm_limit, "api_call_limits_images": 1000,
        "api_calls_reserved_LLM": 0, "api_calls_reserved_images": 0, "created_at": datetime.now(UTC)})
    return world_id


async def test_concurrent_reservations_never_overshoot(stack_info: StackInfo) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stack_info.mongo_uri, tz_aware=True)
    db = client[f"budget_{uuid.uuid4().hex[:10]}"]
    try:
        world_id = await _world(db, cap=1.0)
        budget = MongoBudget(db, daily_cap_usd=0)
        call = CallContext(task_id="t", world_id=world_id, request_type="post")

        async def one() -> bool:
            try:
                await budget.reserve(call, "llm", 0.03)
                return True
            except BudgetExceeded:
                return False

        granted = await asyncio.gather(*(one() for _ in range(50)))
        doc = await db["world_generation_status"].find_one({"_id": world_id})
        assert sum(granted) == 33  # floor(1.0 / 0.03)
        assert doc["budget_committed_usd"] <= 1.0 + 1e-9
        assert doc["api_calls_reserved_LLM"] == 33

        # Settling refunds what a call did not cost, making room again.
        world2 = await _world(db, cap=0.05)
        call2 = CallContext(task_id="t", world_id=world2, request_type="post")
        first = await budget.reserve(call2, "llm", 0.04)
        with pytest.raises(BudgetExceeded, match="would be exceeded"):
            await budget.reserve(call2, "llm", 0.04)
        await budget.settle(first, 0.001)
        await budget.reserve(call2, "llm", 0.04)

        # Call limits hold the same way; the daily cap too.
        world3 = await _world(db, cap=100.0, llm_limit=3)
        call3 = CallContext(task_id="t", world_id=world3, request_type="post")
        for _ in range(3):
            await budget.reserve(call3, "llm", 0.0)
        with pytest.raises(BudgetExceeded, match="call limit"):
            await budget.reserve(call3, "llm", 0.0)
        daily = MongoBudget(db, daily_cap_usd=0.1)
        granted_daily = await asyncio.gather(*(_try(daily, CallContext(None, None, "x"), 0.03) for _ in range(20)))
        assert sum(granted_daily) == 3
    finally:
        await client.close()


async def _try(budget: MongoBudget, call: CallContext, amount: float) -> bool:
    try:
        await budget.reserve(call, "image", amount)
        return True
    except BudgetExceeded:
        return False


async def test_world_over_budget_fails_with_budget_exceeded(wenv: WorkerEnv) -> None:
    await wenv.create_topics()
    # The Gemini image model: its registry price ($0.039) is what the simulator charges by default.
    worker = wenv.start_worker(IMAGE_MODEL="google/gemini-2.5-flash-image", IMAGE_PRICE_USD="0.039")
    client = mongo(wenv.info)
    db = client[wenv.database]
    try:
        world_id = wenv.send_message("--prompt", "A salt desert caravan city", "--users", "3", "--posts", "6",
                                     "--budget-usd", "0.05")
        status = await wait_world(client, wenv.database, world_id, procs=[worker])
        assert status["status"] == "failed"
        assert status["failure_reason"] == "budget_exceeded"
        spent = status["llm_cost_total"] + status["image_cost_total"]
        history = [h async for h in db["api_requests_history"].find(
            {"world_id": world_id, "api_type": {"$in": ["llm", "image_generation"]}})]
        assert abs(sum(h["cost"] for h in history) - spent) < 1e-9
        one_call_max = 0.039 + 8000 * 2.5e-6 + 0.01  # the largest single reservation in this world
        assert spent <= 0.05 + one_call_max
        assert status["budget_committed_usd"] <= 0.05 + 1e-9
        failed = [t async for t in db["tasks"].find({"world_id": world_id, "status": "failed"})]
        assert any(t.get("error_type") == "budget_exceeded" for t in failed)
        refused = [t["error"] for t in failed if "would be exceeded" in (t.get("error") or "")]
        assert refused and all("--budget-usd" in e and "WORLD_BUDGET_FACTOR" in e for e in refused)  # how to raise
        assert await db["tasks"].count_documents(
            {"world_id": world_id, "status": {"$in": ["pending", "in_progress"]}}) == 0
        # The status tells the truth: every stage whose work was cut short is failed, never completed.
        stages = {s["name"]: s["status"] for s in status["stages"]}
        assert stages["finishing"] == "failed"
        assert set(stages.values()) <= {"completed", "failed"}, stages
        registry = build_registry()
        for t in failed:
            assert stages[registry.policy(t["type"]).stage] == "failed", (t["type"], stages)
        assert status["posts_created"] < status["posts_predicted"] == 6
        assert status["users_created"] <= status["users_predicted"] == 3
        rendered = _render(status)
        assert f"{status['posts_created']}/6" in rendered and "budget_exceeded" in rendered
    finally:
        await client.close()


async def test_default_budget_is_scaled_to_the_predicted_cost(wenv: WorkerEnv) -> None:
    """No budget_usd on the task and no WORLD_BUDGET_USD: the cap is WORLD_BUDGET_FACTOR x the predicted cost
    (at least WORLD_BUDGET_MIN_USD); a task's budget_usd still wins."""
    from ai_worker.config import load_settings
    from ai_worker.jobs import build_registry
    from ai_worker.providers.cost import predict_world_cost
    from ai_worker.worlds.plan import WorldPlan

    await wenv.create_topics()
    worker = wenv.start_worker(WORLD_BUDGET_FACTOR="200", WORLD_BUDGET_MIN_USD="0.05")
    client = mongo(wenv.info)
    try:
        scaled = wenv.send_message("--prompt", "A lighthouse archipelago", "--users", "3", "--posts", "6")
        capped = wenv.send_message("--prompt", "A lighthouse archipelago", "--users", "3", "--posts", "6",
                                   "--budget-usd", "0.8")
        plan = WorldPlan(3, 6)
        settings = load_settings(check=False, MONGODB_URI="unset", KAFKA_BROKERS="unset")
        predicted = predict_world_cost(plan, build_registry().predict(plan), settings.models).total_usd
        for world_id, expected in ((scaled, 200 * predicted), (capped, 0.8)):
            status = await wait_world(client, wenv.database, world_id, procs=[worker])
            assert status["status"] == "completed", status
            assert status["budget_usd"] == pytest.approx(expected, abs=0.011)
            assert status["llm_cost_total"] + status["image_cost_total"] <= status["budget_usd"]
    finally:
        await client.close()


def _render(doc: dict[str, Any]) -> str:
    from rich.console import Console

    from ai_worker.views import render_status

    console = Console(width=120, record=True)
    console.print(render_status(doc))
    return console.export_text()
