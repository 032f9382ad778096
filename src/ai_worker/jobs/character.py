"""generate_character: create the AI character on the platform, then its avatar and post batches."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from ai_worker.content.schemas import CharacterSpec
from ai_worker.jobs.character_avatar import GenerateCharacterAvatar
from ai_worker.jobs.context import Job, JobContext
from ai_worker.jobs.post_batch import GeneratePostBatch
from ai_worker.messaging.events import TaskType
from ai_worker.worlds.plan import BATCH_SIZE, Prediction, WorldPlan


class CharacterParams(BaseModel):
    index: int
    character: CharacterSpec
    posts_count: int


class GenerateCharacter(Job[CharacterParams]):
    task_type = TaskType.GENERATE_CHARACTER
    Params = CharacterParams
    stage = "characters"
    timeout_s = 120.0
    priority = 70
    produces = "users"

    @classmethod
    def predict(cls, plan: WorldPlan) -> Prediction:
        return Prediction(tasks=plan.users)

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
        ctx.spawn(GenerateCharacterAvatar, "avatar", GenerateCharacterAvatar.Params(
            character_id=character_id, index=params.index, username=spec.username,
            avatar_prompt=spec.avatar_prompt))
        if params.posts_count > 0:
            ctx.spawn(GeneratePostBatch, "post-batch-0", GeneratePostBatch.Params(
                character_id=character_id, character_index=params.index, character=spec, batch_index=0,
                start_index=0, count=min(BATCH_SIZE, params.posts_count), total=params.posts_count))
        return {"character_id": character_id, "username": spec.username}


JOB = GenerateCharacter
