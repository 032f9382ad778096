"""generate_character: create the AI character on the platform, then its avatar and post batches.

The platform's Character service ignores our `request_id`, so a retried attempt that has no memoised
character id (the previous attempt died, or lost its database, between `CreateCharacter` and saving the id)
first looks for the character that attempt may have made: one of this world's AI characters
(`GetUserCharactersInWorld` with an empty user id) whose `meta` carries this task's username and whose
display name matches. Usernames are unique within a world (the batches drop repeats), and the spec is fixed
by the task's parameters, so the match is the character this task made."""

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
    pool = "llm"
    produces = "users"

    @classmethod
    def predict(cls, plan: WorldPlan) -> Prediction:
        return Prediction(tasks=plan.users)

    async def run(self, ctx: JobContext, params: CharacterParams) -> dict[str, Any]:
        spec = params.character
        meta = json.dumps(spec.model_dump(exclude={"avatar_prompt"}), ensure_ascii=False)

        async def create() -> str:
            if ctx.attempt > 1:
                existing = await find_created(ctx, spec)
                if existing is not None:
                    ctx.log.info("character made by an earlier attempt found; not creating it again",
                                 character_id=existing)
                    return existing
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


async def find_created(ctx: JobContext, spec: CharacterSpec) -> str | None:
    """The id of this world's AI character made for `spec` by an earlier attempt, if any."""
    characters = await ctx.platform.characters.list_characters_in_world(
        ctx.world_id, call=ctx.call("find_character"))
    for character in characters:
        if not character.is_ai or character.display_name != spec.display_name or not character.meta:
            continue
        try:
            meta = json.loads(character.meta)
        except ValueError:
            continue
        if isinstance(meta, dict) and meta.get("username") == spec.username:
            return character.id
    return None


JOB = GenerateCharacter
