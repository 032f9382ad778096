"""generate_world_description: the world, stored in world_parameters and sent to the World service."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ai_worker.content.schemas import WorldDescription
from ai_worker.jobs.character_batch import GenerateCharacterBatch
from ai_worker.jobs.context import Job, JobContext
from ai_worker.jobs.world_image import GenerateWorldImage
from ai_worker.messaging.events import TaskType
from ai_worker.worlds.plan import BATCH_SIZE, Prediction, WorldPlan


class DescriptionParams(BaseModel):
    user_prompt: str
    users_count: int
    posts_count: int


class GenerateWorldDescription(Job[DescriptionParams]):
    task_type = TaskType.GENERATE_WORLD_DESCRIPTION
    Params = DescriptionParams
    stage = "world_description"
    max_attempts = 4
    timeout_s = 600.0
    world_level = True
    priority = 90
    pool = "llm"

    @classmethod
    def predict(cls, plan: WorldPlan) -> Prediction:
        return Prediction(tasks=1, llm_calls_by_step={"world_description": 1})

    async def run(self, ctx: JobContext, params: DescriptionParams) -> dict[str, Any]:
        prompt = ctx.prompt("world_description", user_prompt=params.user_prompt,
                            users_count=params.users_count, posts_count=params.posts_count)
        world = await ctx.step(
            "description", lambda: ctx.llm("world_description", prompt, WorldDescription), WorldDescription
        )
        await ctx.save_world(world)

        async def update_params() -> bool:
            await ctx.platform.worlds.update_world_params(
                world_id=ctx.world_id, params_json=world.model_dump_json(), name=world.name,
                users_count=params.users_count, posts_count=params.posts_count,
                call=ctx.call("update_world_params"),
            )
            return True

        await ctx.step("update_world_params", update_params, bool)
        ctx.spawn(GenerateWorldImage, "world-image", GenerateWorldImage.Params())
        ctx.spawn(GenerateCharacterBatch, "character-batch-0", GenerateCharacterBatch.Params(
            batch_index=0, start_index=0, count=min(BATCH_SIZE, params.users_count),
            users_total=params.users_count, posts_total=params.posts_count))
        return {"name": world.name, "language": world.language}


JOB = GenerateWorldDescription
