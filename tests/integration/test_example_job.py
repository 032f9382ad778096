"""Adding a job type takes one module, one prompt and one registry line (docs/ADDING_A_JOB.md).

`GenerateGreeting` below is such a module, written in a test: its policy as class attributes, its own
`Params`, a memoised LLM call through its prompt (`greeting.md`, in a temporary prompt directory), and a
child declared with its job class. It is registered next to the nine jobs (the "registry line") and run by
the real engine against the real database and the provider simulator: nothing else in `src/` changes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fakes import MemoryRecorder
from pydantic import BaseModel, ConfigDict
from pymongo import AsyncMongoClient

from ai_worker.content.prompts import PromptLibrary
from ai_worker.devstack.stack import StackInfo
from ai_worker.jobs import build_registry
from ai_worker.jobs.context import Job, JobContext, Services
from ai_worker.llm.client import LLMClient
from ai_worker.tasks.engine import Engine
from ai_worker.tasks.model import child_task_id
from ai_worker.tasks.progress import WorldProgress
from ai_worker.tasks.retry import RetryPolicy
from ai_worker.tasks.store import TaskStore
from ai_worker.worlds.plan import Prediction, WorldPlan
from ai_worker.worlds.status import WorldStatusStore

pytestmark = pytest.mark.integration


class Greeting(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str


class ThanksParams(BaseModel):
    to: str


class GenerateThanks(Job[ThanksParams]):
    task_type = "generate_thanks"
    Params = ThanksParams
    stage = "posts"

    async def run(self, ctx: JobContext, params: ThanksParams) -> dict[str, Any]:
        return {"to": params.to}


class GreetingParams(BaseModel):
    name: str


class GenerateGreeting(Job[GreetingParams]):
    task_type = "generate_greeting"
    Params = GreetingParams
    stage = "posts"
    timeout_s = 60.0
    priority = 5

    @classmethod
    def predict(cls, plan: WorldPlan) -> Prediction:
        return Prediction(tasks=plan.users, llm_calls=plan.users)

    async def run(self, ctx: JobContext, params: GreetingParams) -> dict[str, Any]:
        prompt = ctx.prompt("greeting", name=params.name)
        greeting = await ctx.step("greeting", lambda: ctx.llm("greeting", prompt, Greeting), Greeting)
        ctx.spawn(GenerateThanks, "thanks", GenerateThanks.Params(to=params.name))
        return {"text": greeting.text}


class Events:
    def __init__(self) -> None:
        self.published: list[str] = []

    async def publish_task(self, task_id: str, task_type: str, world_id: str) -> None:
        self.published.append(task_type)

    async def publish_progress(self, event: dict[str, Any]) -> None:
        return None


@pytest.fixture
async def db(stack_info: StackInfo) -> AsyncIterator[Any]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stack_info.mongo_uri, tz_aware=True)
    try:
        yield client[f"example_{uuid.uuid4().hex[:10]}"]
    finally:
        await client.close()


async def test_a_new_job_type_runs_with_one_module_one_prompt_one_registry_line(
        db: Any, stack_info: StackInfo, tmp_path: Path) -> None:
    (tmp_path / "greeting.md").write_text("## system\nYou greet people.\n\n## user\nGreet $name warmly.\n")
    registry = build_registry()
    registry.register(GenerateGreeting)  # the registry line
    registry.register(GenerateThanks)
    assert registry.policy("generate_greeting").timeout_s == 60.0
    assert registry.predict(WorldPlan(3, 6)).tasks == build_registry().predict(WorldPlan(3, 6)).tasks + 3

    assert stack_info.simulator_url is not None
    recorder = MemoryRecorder()
    llm = LLMClient.single(base_url=stack_info.simulator_url, api_key="sim-key", model="sim/model", recorder=recorder)
    services = Services(llm=llm, images=None, media=None, platform=None,  # type: ignore[arg-type]
                        prompts=PromptLibrary(tmp_path), worlds=None)  # type: ignore[arg-type]
    events = Events()
    engine = Engine(store=TaskStore(db), progress=WorldProgress(WorldStatusStore(db), registry, tasks=TaskStore(db)),
                  registry=registry,
                    context_factory=JobContext.factory(services), publisher=events, worker_id="w1", lease_s=30,
                    policy=RetryPolicy(base_delay_s=0.05, max_delay_s=0.1))
    task_id, now = str(uuid.uuid4()), datetime.now(UTC)
    await db["tasks"].insert_one({"_id": task_id, "type": "generate_greeting", "world_id": str(uuid.uuid4()),
                                  "status": "pending", "worker_id": None, "parameters": {"name": "Ada"},
                                  "result": None, "error": None, "attempt_count": 0, "created_at": now,
                                  "updated_at": now})
    try:
        task = await engine.store.get(task_id)
        assert task is not None
        await engine.process(task)
    finally:
        engine.close()
        await llm.aclose()

    doc = await db["tasks"].find_one({"_id": task_id})
    assert doc["status"] == "completed" and doc["result"]["text"], doc.get("error")
    assert "greeting" in doc["steps"], "the LLM call was memoised"
    assert [r.request_type for r in recorder.records] == ["greeting"]
    child = await db["tasks"].find_one({"_id": child_task_id(task_id, "thanks")})
    assert child is not None and child["type"] == "generate_thanks" and child["parameters"] == {"to": "Ada"}
    assert events.published == ["generate_thanks"]
