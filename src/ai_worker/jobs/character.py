"""generate_character: create the AI character on the platform, then its avatar and post batches."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from ai_worker.content.schemas import CharacterSpec
from ai_worker.jobs.character_batch import CharacterParams
from ai_worker.jobs.common import BATCH_SIZE
from ai_worker.messaging.events import TaskType
from ai_worker.tasks.context import JobContext
from ai_worker.tasks.registry import Job


class AvatarParams(BaseModel):
    character_id: str
    index: int
    username: str
    avatar_prompt: str


class PostBatchParams(BaseModel):
    character_id: str
    character_index: int
    character: CharacterSpec
    batch_index: int
    start_index: int
    count: int
    total: int
    existing: list[str] = []


class GenerateCharacter(Job[CharacterParams]):
    task_type = TaskType.GENERATE_CHARACTER
    Params = CharacterParams

    async def run(self, ctx: JobContext, params: CharacterParams) -> dict[str, Any]:
        spec = params.character
        meta = json.dumps(spec.model_dump(exclude={"avatar_prompt"}), ensure_ascii=False)

        async def create() -> str:
            created = await ctx.platform.characters.create_character(
                world_id=ctx.world_id, display_name=spec.display_name, meta=meta,
                request_id=ctx.request_id("create_character"), call=ctx.call("create_character"),
            )
            return str(created.id)

        character_id = await ctx.step("character_id", create, str)
        ctx.spawn(TaskType.GENERATE_CHARACTER_AVATAR, "avatar",
                  AvatarParams(character_id=character_id, index=params.index, username=spec.username,
                               avatar_prompt=spec.avatar_prompt))
        if params.posts_count > 0:
            ctx.spawn(TaskType.GENERATE_POST_BATCH, "post-batch-0",
                      PostBatchParams(character_id=character_id, character_index=params.index, character=spec,
                                      batch_index=0, start_index=0, count=min(BATCH_SIZE, params.posts_count),
                                      total=params.posts_count))
        return {"character_id": character_id, "username": spec.username}


JOB = GenerateCharacter
