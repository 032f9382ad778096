"""generate_world_description: the world, stored in world_parameters and sent to the World service."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ai_worker.content.schemas import WorldDescription
from ai_worker.jobs.common import BATCH_SIZE
from ai_worker.jobs.init_world import DescriptionParams
from ai_worker.messaging.events import TaskType
from ai_worker.tasks.context import JobContext
from ai_worker.tasks.registry import Job


class CharacterBatchParams(BaseModel):
    batch_index: int
    start_index: int
    count: int
    users_total: int
    posts_total: int
    existing: list[str] = []


class WorldImageParams(BaseModel):
    pass


class GenerateWorldDescription(Job[DescriptionParams]):
    task_type = TaskType.GENERATE_WORLD_DESCRIPTION
    Params = DescriptionParams

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
        ctx.spawn(TaskType.GENERATE_WORLD_IMAGE, "world-image", WorldImageParams())
        ctx.spawn(
            TaskType.GENERATE_CHARACTER_BATCH, "character-batch-0",
            CharacterBatchParams(batch_index=0, start_index=0, count=min(BATCH_SIZE, params.users_count),
                                 users_total=params.users_count, posts_total=params.posts_count),
        )
        return {"name": world.name, "language": world.language}


JOB = GenerateWorldDescription
