"""The engine against the real database (SecantusDB): claims, retries that resume from memoised steps,
attempt limits, lost leases and cancellation. Jobs here are small test jobs registered under real task
types; the publisher records events instead of talking to Kafka (the consumer has its own tests)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel
from pymongo import AsyncMongoClient

from ai_worker.devstack.stack import StackInfo
from ai_worker.errors import ProviderRejected, ProviderUnavailable
from ai_worker.messaging.events import TaskType
from ai_worker.tasks.context import TaskContext
from ai_worker.tasks.engine import Engine
from ai_worker.tasks.model import child_task_id
from ai_worker.tasks.progress import WorldProgress
from ai_worker.tasks.registry import Job, JobRegistry
from ai_worker.tasks.retry import RetryPolicy
from ai_worker.tasks.store import TaskStore
from ai_worker.worlds.status import WorldStatusStore

pytestmark = pytest.mark.integration


class Recorder:
    def __init__(self) -> None:
        self.tasks: list[str] = []
        self.progress: list[dict[str, Any]] = []

    async def publish_task(self, task_id: str, task_type: str, world_id: str) -> None:
        self.tasks.append(task_id)

    async def publish_progress(self, event: dict[str, Any]) -> None:
        self.progress.append(event)


class NoParams(BaseModel):
    pass


class ChildParams(BaseModel):
    i: int


class ChildJob(Job[ChildParams, TaskContext]):
    task_type = TaskType.GENERATE_POST_IMAGE
    Params = ChildParams
    stage = "posts"

    async def run(self, ctx: TaskContext, params: ChildParams) -> dict[str, Any]:
        return {}


class Script:
    """What the test job does; set per test."""

    paid_calls = 0
    fail_with: ClassVar[list[BaseException | None]] = []
    children = 0
    gate: asyncio.Event | None = None
    loop_until_dead = False


class ScriptedJob(Job[NoParams, TaskContext]):
    task_type = TaskType.GENERATE_POST
    Params = NoParams
    stage = "posts"

    async def run(self, ctx: TaskContext, params: NoParams) -> dict[str, Any]:
        async def paid() -> int:
            Script.paid_calls += 1
            return 42

        value = await ctx.step("paid", paid, int)
        if Script.gate is not None:
            await Script.gate.wait()
        while Script.loop_until_dead:
            await asyncio.sleep(0.05)
            ctx.check_alive()
        if Script.fail_with:
            exc = Script.fail_with.pop(0)
            if exc is not None:
                raise exc
        for i in range(Script.children):
            ctx.spawn(ChildJob, f"child-{i}", ChildParams(i=i))
        return {"value": value}


@pytest.fixture
async def db(stack_info: StackInfo) -> AsyncIterator[Any]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stack_info.mongo_uri, tz_aware=True)
    database = client[f"engine_{uuid.uuid4().hex[:10]}"]
    Script.paid_calls, Script.fail_with, Script.children, Script.gate = 0, [], 0, None
    Script.loop_until_dead = False
    try:
        yield database
    finally:
        await client.close()


def make_engine(db: Any, worker: str, publisher: Recorder, lease_s: float = 30.0) -> Engine:
    registry = JobRegistry()
    registry.register(ScriptedJob)
    registry.register(ChildJob)
    return Engine(store=TaskStore(db), progress=WorldProgress(WorldStatusStore(db), registry, tasks=TaskStore(db)),
                  registry=registry,
                  publisher=publisher, worker_id=worker, lease_s=lease_s,
                  policy=RetryPolicy(base_delay_s=0.05, max_delay_s=0.1))


async def new_task(db: Any) -> str:
    task_id = str(uuid.uuid4())
    now = datetime.now(UTC)
    await db["tasks"].insert_one({
        "_id": task_id, "type": TaskType.GENERATE_POST.value, "world_id": str(uuid.uuid4()), "status": "pending",
        "worker_id": None, "parameters": {}, "result": None, "error": None, "attempt_count": 0,
        "created_at": now, "updated_at": now,
    })
    return task_id


async def process(engine: Engine, task_id: str) -> None:
    task = await engine.store.get(task_id)
    assert task is not None
    await engine.process(task)


async def test_claim_is_exclusive_under_races(db: Any) -> None:
    task_id = await new_task(db)
    store = TaskStore(db)
    claims = await asyncio.gather(*(store.claim(task_id, f"w{i}", 30) for i in range(10)))
    winners = [c for c in claims if c is not None]
    assert len(winners) == 1
    assert winners[0].attempt_count == 1 and winners[0].status == "in_progress"


async def test_retry_resumes_from_memoised_step(db: Any) -> None:
    publisher = Recorder()
    engine = make_engine(db, "w1", publisher)
    task_id = await new_task(db)
    Script.fail_with = [ProviderUnavailable("provider answered 503")]
    await process(engine, task_id)

    doc = await db["tasks"].find_one({"_id": task_id})
    assert doc["status"] == "pending" and doc["not_before"] is not None
    assert doc["steps"]["paid"] == 42
    assert doc["attempts"][0]["outcome"] == "retrying"
    assert doc["attempts"][0]["error_type"] == "provider_unavailable"
    assert publisher.progress[-1]["event_type"] == "task_retrying"
    assert publisher.progress[-1]["retry_possible"] is True
    await asyncio.sleep(0.3)  # the local timer republishes the event after the backoff
    assert publisher.tasks == [task_id]

    await process(engine, task_id)
    doc = await db["tasks"].find_one({"_id": task_id})
    assert doc["status"] == "completed" and doc["attempt_count"] == 2
    assert Script.paid_calls == 1, "the paid step ran again on retry"
    engine.close()


async def test_permanent_error_fails_at_once(db: Any) -> None:
    publisher = Recorder()
    engine = make_engine(db, "w1", publisher)
    task_id = await new_task(db)
    Script.fail_with = [ProviderRejected("HTTP 400: bad request")]
    await process(engine, task_id)
    doc = await db["tasks"].find_one({"_id": task_id})
    assert doc["status"] == "failed" and "HTTP 400" in doc["error"]
    assert publisher.progress[-1]["event_type"] == "task_failed"
    assert publisher.progress[-1]["retry_possible"] is False


async def test_attempt_limit_is_enforced(db: Any) -> None:
    engine = make_engine(db, "w1", Recorder())
    task_id = await new_task(db)
    Script.fail_with = [ProviderUnavailable("503"), ProviderUnavailable("503"), None]
    await process(engine, task_id)
    await asyncio.sleep(0.15)  # past not_before
    await process(engine, task_id)
    doc = await db["tasks"].find_one({"_id": task_id})
    assert doc["status"] == "failed", "generate_post allows 2 attempts"
    assert doc["attempt_count"] == 2 and len(doc["attempts"]) == 2
    engine.close()


async def test_worker_that_lost_its_lease_cannot_complete(db: Any) -> None:
    first, second = make_engine(db, "w1", Recorder()), make_engine(db, "w2", Recorder())
    task_id = await new_task(db)
    Script.gate = asyncio.Event()
    Script.children = 2
    running = asyncio.create_task(process(first, task_id))
    await asyncio.sleep(0.3)
    # The lease of w1 expires (as if w1 had stalled); w2 reclaims and finishes the task.
    await db["tasks"].update_one({"_id": task_id}, {"$set": {"lease_until": datetime.now(UTC) - timedelta(seconds=1)}})
    Script.gate.set()
    Script.gate = None
    await process(second, task_id)
    await running
    doc = await db["tasks"].find_one({"_id": task_id})
    assert doc["status"] == "completed" and doc["worker_id"] == "w2"
    children = await db["tasks"].count_documents({"parent_id": task_id})
    assert children == 2, "children are deterministic: the two runs produced the same two"
    assert await db["tasks"].find_one({"_id": child_task_id(task_id, "child-0")}) is not None


async def test_cancel_stops_a_running_job_without_effects(db: Any) -> None:
    engine = make_engine(db, "w1", Recorder(), lease_s=1.5)
    task_id = await new_task(db)
    Script.loop_until_dead = True
    Script.children = 3
    running = asyncio.create_task(process(engine, task_id))
    await asyncio.sleep(0.3)
    world_id = (await db["tasks"].find_one({"_id": task_id}))["world_id"]
    assert await TaskStore(db).cancel_world(world_id, "cancelled by test") == 1
    await asyncio.wait_for(running, timeout=5)
    doc = await db["tasks"].find_one({"_id": task_id})
    assert doc["status"] == "cancelled"
    assert await db["tasks"].count_documents({"parent_id": task_id}) == 0


async def test_task_of_a_cancelled_world_is_cancelled_not_run(db: Any) -> None:
    engine = make_engine(db, "w1", Recorder())
    task_id = await new_task(db)
    world_id = (await db["tasks"].find_one({"_id": task_id}))["world_id"]
    await db["world_generation_status"].insert_one({"_id": world_id, "status": "failed",
                                                    "failure_reason": "cancelled by operator"})
    await process(engine, task_id)
    doc = await db["tasks"].find_one({"_id": task_id})
    assert doc["status"] == "cancelled" and "cancelled by operator" in doc["error"]
    assert Script.paid_calls == 0
