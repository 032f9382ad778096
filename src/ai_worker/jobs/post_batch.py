"""generate_post_batch: up to 10 post ideas for one character; batches run one after another so each knows
the topics already planned. A batch short of usable ideas keeps them and the next batch starts where it
ended, so the character gets exactly its share of posts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from ai_worker.content.schemas import CharacterSpec, PostBatch, PostIdea
from ai_worker.content.world import render_character, render_world
from ai_worker.jobs.common import bullet_list, collect
from ai_worker.jobs.context import Job, JobContext
from ai_worker.jobs.post import GeneratePost
from ai_worker.messaging.events import TaskType
from ai_worker.worlds.plan import BATCH_SIZE, Prediction, WorldPlan


class PostBatchParams(BaseModel):
    character_id: str
    character_index: int
    character: CharacterSpec
    batch_index: int
    start_index: int
    count: int
    total: int
    existing: list[str] = []


class GeneratePostBatch(Job[PostBatchParams]):
    task_type = TaskType.GENERATE_POST_BATCH
    Params = PostBatchParams
    stage = "posts"
    timeout_s = 600.0
    priority = 60
    pool = "llm"

    @classmethod
    def predict(cls, plan: WorldPlan) -> Prediction:
        n = plan.post_batches()
        return Prediction(tasks=n, llm_calls_by_step={"post_batch": n})

    async def run(self, ctx: JobContext, params: PostBatchParams) -> dict[str, Any]:
        world_text = render_world(await ctx.world())
        character_text = render_character(params.character)

        async def ask(number: int, missing: int, have: list[PostIdea]) -> Sequence[PostIdea]:
            prompt = ctx.prompt("post_batch", world=world_text, character=character_text,
                                existing=bullet_list(params.existing + [i.topic for i in have]), count=missing)
            # Each ask is memoised: a retry replays the asks already paid for.
            batch = await ctx.step(f"ask-{number}", lambda: ctx.llm("post_batch", prompt, PostBatch), PostBatch)
            return batch.posts

        async def generate() -> list[PostIdea]:
            return await collect(params.count, ask, lambda i: i.topic.strip().lower(),
                                 {t.strip().lower() for t in params.existing})

        ideas = await ctx.step("ideas", generate, list[PostIdea])
        for offset, idea in enumerate(ideas):
            index = params.start_index + offset
            ctx.spawn(GeneratePost, f"post-{index}", GeneratePost.Params(
                character_id=params.character_id, character=params.character, post_index=index, idea=idea))
        next_start = params.start_index + len(ideas)  # a shortfall moves to the next batch
        if next_start < params.total:
            ctx.spawn(GeneratePostBatch, f"post-batch-{params.batch_index + 1}", params.model_copy(update={
                "batch_index": params.batch_index + 1, "start_index": next_start,
                "count": min(BATCH_SIZE, params.total - next_start),
                "existing": params.existing + [i.topic for i in ideas]}))
        return {"topics": [i.topic for i in ideas], "asked": params.count, "made": len(ideas)}


JOB = GeneratePostBatch
