"""The engine against the real database (SecantusDB): claims, retries that resume from memoised steps,
attempt limits, lost leases and cancellation. Jobs here are small test jobs registered under real task
types; the publisher records events instead of talking to Kafka (the consumer has its own tests)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel
from pymongo import AsyncMongoClient
from structlog.testing import capture_logs
from support import eventually

from ai_worker.devstack.processes import DatabaseProcess
from ai_worker.devstack.stack import StackInfo
from ai_worker.errors import ProviderRejected, ProviderUnavailable
from ai_worker.messaging.events import BadMessage, TaskType
from ai_worker.tasks.context import TaskContext
from ai_worker.tasks.engine import Engine
from ai_worker.tasks.model import TaskDoc, child_task_id
from ai_worker.tasks.progress import WorldProgress
from ai_worker.tasks.reconciler import Reconciler
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


# --- the lease rule -----------------------------------------------------------------------------------------
# Worker A claims a task and starts its job; the job then waits on an event. Meanwhile A's lease expires (as
# if A had stalled: a long GC pause, a network partition) and the task is claimed again, by another worker or
# by the same worker id on a later attempt (its process restarted). When A's job goes on, every write A tries
# (complete, fail, schedule a retry, save a step, renew the lease) must be refused: the document stays exactly
# as the new claim left it. Sequencing is by events and polled conditions, never by sleeping.


class Lease:
    """What the lease test job does; reset per test by the `db` fixture."""

    action = "complete"  # complete | fail | retry | step | loop
    started: asyncio.Event = asyncio.Event()
    gate: asyncio.Event = asyncio.Event()
    paid_calls = 0

    @classmethod
    def reset(cls, action: str = "complete") -> None:
        cls.action, cls.started, cls.gate, cls.paid_calls = action, asyncio.Event(), asyncio.Event(), 0


class LeaseJob(Job[NoParams, TaskContext]):
    task_type = TaskType.GENERATE_POST
    Params = NoParams
    stage = "posts"

    async def run(self, ctx: TaskContext, params: NoParams) -> dict[str, Any]:
        Lease.started.set()
        if Lease.action == "loop":  # a long job that checks, between its steps, that it still owns the task
            while True:
                await asyncio.sleep(0.02)
                ctx.check_alive()
        await Lease.gate.wait()
        if Lease.action == "fail":
            raise ProviderRejected("HTTP 400 seen by worker A")
        if Lease.action == "retry":
            raise ProviderUnavailable("HTTP 503 seen by worker A")
        if Lease.action == "step":
            async def paid() -> int:
                Lease.paid_calls += 1
                return 7

            await ctx.step("paid_by_a", paid, int)
        for i in range(2):
            ctx.spawn(ChildJob, f"child-{i}", ChildParams(i=i))
        return {"by": ctx.worker_id, "attempt": ctx.attempt}


def make_lease_engine(db: Any, worker: str, publisher: Recorder, lease_s: float = 30.0) -> Engine:
    registry = JobRegistry()
    registry.register(LeaseJob)
    registry.register(ChildJob)
    return Engine(store=TaskStore(db), progress=WorldProgress(WorldStatusStore(db), registry), registry=registry,
                  publisher=publisher, worker_id=worker, lease_s=lease_s,
                  policy=RetryPolicy(base_delay_s=0.05, max_delay_s=0.1))


async def expire_and_reclaim(db: Any, task_id: str, worker: str) -> TaskDoc:
    """Expire the current lease and claim the task as `worker` (the claim a second worker would make). Retried
    until it wins: a heartbeat of the current holder may renew the lease between the two writes."""
    store = TaskStore(db)

    async def attempt() -> TaskDoc | None:
        await db["tasks"].update_one({"_id": task_id, "status": "in_progress"},
                                     {"$set": {"lease_until": datetime.now(UTC) - timedelta(seconds=1)}})
        return await store.claim(task_id, worker, 30)

    return await eventually(attempt, timeout_s=5, what="a second claim")


def lease_warnings(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("log_level") == "warning"
            and "lease" in f"{e.get('event', '')} {e.get('reason', '')}"]


LEASE_ACTIONS = ("complete", "fail", "retry", "step")


@pytest.mark.parametrize("reclaimer", ["w2", "w1"], ids=["reclaimed-by-another-worker", "same-worker-next-attempt"])
@pytest.mark.parametrize("action", LEASE_ACTIONS)
async def test_worker_that_lost_its_lease_is_refused(db: Any, action: str, reclaimer: str) -> None:
    Lease.reset(action)
    publisher = Recorder()
    a = make_lease_engine(db, "w1", publisher)
    task_id = await new_task(db)
    with capture_logs() as logs:
        running = asyncio.create_task(process(a, task_id))
        await asyncio.wait_for(Lease.started.wait(), timeout=10)
        claim = await expire_and_reclaim(db, task_id, reclaimer)
        assert claim.worker_id == reclaimer and claim.attempt_count == 2
        reclaimed = await db["tasks"].find_one({"_id": task_id})
        Lease.gate.set()  # worker A wakes up and tries to finish its attempt
        await asyncio.wait_for(running, timeout=10)

    doc = await db["tasks"].find_one({"_id": task_id})
    # Nothing A wrote reached the task: the document is exactly as the second claim left it.
    assert doc == reclaimed, f"worker A's {action} changed the task of the new claim"
    assert doc["status"] == "in_progress" and doc["worker_id"] == reclaimer and doc["attempt_count"] == 2
    assert doc["result"] is None and doc["error"] is None and "error_type" not in doc
    assert "not_before" not in doc and "completed_at" not in doc
    assert "paid_by_a" not in doc.get("steps", {})
    assert all("outcome" not in attempt for attempt in doc["attempts"]), doc["attempts"]
    # ... and nothing A would announce after a successful write was announced.
    assert publisher.tasks == [] and publisher.progress == []
    assert lease_warnings(logs), logs
    if action == "step":
        assert Lease.paid_calls == 1  # the call ran; its result was not kept for A
    a.close()

    # The new holder is unaffected: its own writes go through.
    assert await TaskStore(db).complete(claim, reclaimer, {"by": "second claim"})
    doc = await db["tasks"].find_one({"_id": task_id})
    assert doc["status"] == "completed" and doc["result"] == {"by": "second claim"}
    if action == "complete":  # A inserted its children before it was refused; their ids are deterministic
        assert await db["tasks"].count_documents({"parent_id": task_id}) == 2
        assert await db["tasks"].find_one({"_id": child_task_id(task_id, "child-0")}) is not None


@pytest.mark.parametrize("reclaimer", ["w2", "w1"], ids=["reclaimed-by-another-worker", "same-worker-next-attempt"])
async def test_heartbeat_of_a_lost_lease_is_refused_and_the_job_stops(db: Any, reclaimer: str) -> None:
    Lease.reset("loop")
    a = make_lease_engine(db, "w1", Recorder(), lease_s=1.5)  # heartbeat every 0.5 s
    task_id = await new_task(db)
    with capture_logs() as logs:
        running = asyncio.create_task(process(a, task_id))
        await asyncio.wait_for(Lease.started.wait(), timeout=10)
        claim = await expire_and_reclaim(db, task_id, reclaimer)
        # A's next renewal finds the claim gone; its job stops at its next check.
        await asyncio.wait_for(running, timeout=10)
    doc = await db["tasks"].find_one({"_id": task_id})
    assert doc["worker_id"] == reclaimer and doc["attempt_count"] == 2 and doc["status"] == "in_progress"
    assert doc["lease_until"] == claim.lease_until, "worker A extended the lease of the new claim"
    assert doc.get("result") is None and "outcome" not in doc["attempts"][0]
    events = [e["event"] for e in logs]
    assert any("lease lost" in e for e in events), events
    assert "task abandoned" in events, events
    a.close()


async def test_cancel_stops_a_running_job_without_effects(db: Any) -> None:
    Lease.reset("loop")
    publisher = Recorder()
    engine = make_lease_engine(db, "w1", publisher, lease_s=1.5)
    task_id = await new_task(db)
    world_id = (await db["tasks"].find_one({"_id": task_id}))["world_id"]
    with capture_logs() as logs:
        running = asyncio.create_task(process(engine, task_id))
        await asyncio.wait_for(Lease.started.wait(), timeout=10)  # the job is running now
        assert (await db["tasks"].find_one({"_id": task_id}))["status"] == "in_progress"
        assert await TaskStore(db).cancel_world(world_id, "cancelled by test") == 1
        await asyncio.wait_for(running, timeout=10)
    doc = await db["tasks"].find_one({"_id": task_id})
    assert doc["status"] == "cancelled" and doc["error"] == "cancelled by test"
    assert await db["tasks"].count_documents({"parent_id": task_id}) == 0
    assert publisher.tasks == [] and publisher.progress == []
    assert "task abandoned" in [e["event"] for e in logs]
    engine.close()


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


# --- error paths ---------------------------------------------------------------------------------------------


async def test_unknown_task_type_fails_from_pending_and_is_dead_lettered(db: Any) -> None:
    engine = make_engine(db, "w1", Recorder())
    task_id = await new_task(db)
    await db["tasks"].update_one({"_id": task_id}, {"$set": {"type": "generate_haiku"}})
    task = await engine.store.get(task_id)
    assert task is not None
    with pytest.raises(BadMessage, match="unknown task type 'generate_haiku'"):  # the consumer dead-letters it
        await engine.process(task)
    doc = await db["tasks"].find_one({"_id": task_id})
    assert doc["status"] == "failed" and doc["error_type"] == "unknown_task_type"
    assert "generate_haiku" in doc["error"] and doc["attempt_count"] == 0, "never claimed"
    # A second event for it finds it failed: still dead-lettered (the type is unknown), nothing rewritten.
    with pytest.raises(BadMessage):
        await engine.process(task)
    assert (await db["tasks"].find_one({"_id": task_id}))["updated_at"] == doc["updated_at"]


async def test_task_not_yet_due_is_rescheduled_for_when_it_is(db: Any) -> None:
    publisher = Recorder()
    engine = make_engine(db, "w1", publisher)
    task_id = await new_task(db)
    due = datetime.now(UTC) + timedelta(seconds=0.6)
    await db["tasks"].update_one({"_id": task_id}, {"$set": {"not_before": due}})
    with capture_logs() as logs:
        await process(engine, task_id)
    doc = await db["tasks"].find_one({"_id": task_id})
    assert doc["status"] == "pending" and doc["attempt_count"] == 0, "a task is not claimed before it is due"
    scheduled = [e for e in logs if e["event"].startswith("task not due yet")]
    assert scheduled and 0 < scheduled[0]["in_s"] <= 0.6
    assert publisher.tasks == []
    await eventually(lambda: _value(publisher.tasks == [task_id]), timeout_s=5, what="the event republished")
    assert datetime.now(UTC) >= due
    await process(engine, task_id)  # now it is due
    assert (await db["tasks"].find_one({"_id": task_id}))["status"] == "completed"
    engine.close()


class BatchingPublisher(Recorder):
    """Acknowledges a task event only once `expected` of them are in flight, the way a producer acknowledges
    a batch: an engine that waits for each acknowledgement before sending the next never gets one."""

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.expected = expected
        self.all_sent = asyncio.Event()

    async def publish_task(self, task_id: str, task_type: str, world_id: str) -> None:
        self.tasks.append(task_id)
        if len(self.tasks) >= self.expected:
            self.all_sent.set()
        await asyncio.wait_for(self.all_sent.wait(), 2.0)


async def test_the_events_of_a_tasks_children_are_sent_together(db: Any) -> None:
    """A batch's last child (often the one that continues its chain) is not held back behind one
    acknowledged round trip per earlier child."""
    publisher = BatchingPublisher(expected=5)
    engine = make_engine(db, "w1", publisher)
    task_id = await new_task(db)
    Script.children = 5
    with capture_logs() as logs:
        await process(engine, task_id)
    assert sorted(publisher.tasks) == sorted(child_task_id(task_id, f"child-{i}") for i in range(5))
    assert not [e for e in logs if e["event"].startswith("publish failed")]


class FailingPublisher(Recorder):
    """The broker is down: every publish fails."""

    async def publish_task(self, task_id: str, task_type: str, world_id: str) -> None:
        raise ConnectionError("broker unavailable")

    async def publish_progress(self, event: dict[str, Any]) -> None:
        raise ConnectionError("broker unavailable")


async def test_children_whose_publish_failed_are_republished_by_the_reconciler(db: Any) -> None:
    engine = make_engine(db, "w1", FailingPublisher())
    task_id = await new_task(db)
    Script.children = 2
    with capture_logs() as logs:
        await process(engine, task_id)
    assert (await db["tasks"].find_one({"_id": task_id}))["status"] == "completed"
    children = [child_task_id(task_id, f"child-{i}") for i in range(2)]
    assert await db["tasks"].count_documents({"_id": {"$in": children}, "status": "pending"}) == 2
    failed = [e for e in logs if e["event"].startswith("publish failed")]
    assert sorted(e["task_id"] for e in failed) == sorted(children)

    # The reconciler's pass: a publisher that still fails leaves them due for the next pass ...
    store = TaskStore(db)
    broken = Reconciler(db=db, store=store, engine=engine, publisher=FailingPublisher(), worker_id="w1",
                        interval_s=0.05, lease_s=30)
    await eventually(lambda: _untouched_for(db, children, 0.05), timeout_s=5, what="children older than the interval")
    with capture_logs() as logs:
        report = await broken.reconcile_once()
    assert report["publish_failed"] == 2 and report["republished"] == 0
    assert len([e for e in logs if e["event"].startswith("republish failed")]) == 2
    # ... and once the broker is back, they are republished.
    publisher = Recorder()
    working = Reconciler(db=db, store=store, engine=engine, publisher=publisher, worker_id="w1", interval_s=0.05,
                         lease_s=30)
    report = await working.reconcile_once()
    assert report["republished"] == 2 and sorted(publisher.tasks) == sorted(children)


async def _untouched_for(db: Any, ids: list[str], seconds: float) -> bool:
    since = datetime.now(UTC) - timedelta(seconds=seconds)
    docs = [d async for d in db["tasks"].find({"_id": {"$in": ids}}, {"updated_at": 1})]
    return len(docs) == len(ids) and all(d["updated_at"] < since for d in docs)


async def _value(value: bool) -> bool:
    return value


async def test_lease_renewal_failing_while_the_database_is_down(tmp_path: Path) -> None:
    """The heartbeat keeps trying through an outage; when the database is back and nobody took the task,
    the renewal succeeds again and the job finishes as the same attempt."""
    Lease.reset("complete")
    database = DatabaseProcess(tmp_path / "db")
    await database.astart()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        database.uri, tz_aware=True, serverSelectionTimeoutMS=300, connectTimeoutMS=300)
    try:
        db = client["engine_outage"]
        engine = make_lease_engine(db, "w1", Recorder(), lease_s=1.5)  # heartbeat every 0.5 s
        task_id = await new_task(db)
        with capture_logs() as logs:
            running = asyncio.create_task(process(engine, task_id))
            await asyncio.wait_for(Lease.started.wait(), timeout=10)
            await database.astop()
            await eventually(lambda: _value(any(e["event"] == "lease renewal failed" for e in logs)), timeout_s=10,
                             what="a failed renewal")
            await database.astart()
            # Renewals go through again (nobody re-claimed the task); then the job is let finish.
            await eventually(lambda: _renewed_after(db, task_id, datetime.now(UTC)), timeout_s=15,
                             what="a renewal after the outage")
            Lease.gate.set()
            await asyncio.wait_for(running, timeout=15)
        doc = await db["tasks"].find_one({"_id": task_id})
        assert doc["status"] == "completed" and doc["worker_id"] == "w1" and doc["attempt_count"] == 1
        assert not [e for e in logs if e["event"] == "task abandoned"]
        engine.close()
    finally:
        await client.close()
        await database.astop()


async def _renewed_after(db: Any, task_id: str, moment: datetime) -> bool:
    try:
        doc = await db["tasks"].find_one({"_id": task_id})
    except Exception:
        return False
    return bool(doc and doc["lease_until"] > moment + timedelta(seconds=1))
