"""generate_character_batch: up to 10 characters per batch; batches run one after another so each is told
what the earlier ones produced. A batch that got fewer usable characters than it asked for keeps them and
the next batch starts where it ended, so the world gets exactly `users_count` characters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from ai_worker.content.schemas import CharacterBatch, CharacterSpec
from ai_worker.content.world import render_world
from ai_worker.jobs.character import GenerateCharacter
from ai_worker.jobs.common import bullet_list, collect, slug
from ai_worker.jobs.context import Job, JobContext
from ai_worker.messaging.events import TaskType
from ai_worker.worlds.plan import BATCH_SIZE, Prediction, WorldPlan


class CharacterBatchParams(BaseModel):
    batch_index: int
    start_index: int
    count: int
    users_total: int
    posts_total: int
    existing: list[str] = []


class GenerateCharacterBatch(Job[CharacterBatchParams]):
    task_type = TaskType.GENERATE_CHARACTER_BATCH
    Params = CharacterBatchParams
    stage = "characters"
    max_attempts = 4
    timeout_s = 600.0
    world_level = True
    priority = 80
    pool = "llm"

    @classmethod
    def predict(cls, plan: WorldPlan) -> Prediction:
        n = plan.character_batches()
        return Prediction(tasks=n, llm_calls_by_step={"character_batch": n})

    async def run(self, ctx: JobContext, params: CharacterBatchParams) -> dict[str, Any]:
        world_text = render_world(await ctx.world())
        taken = {line.split("@", 1)[1].split(")", 1)[0] for line in params.existing if "@" in line}

        async def ask(number: int, missing: int, have: list[CharacterSpec]) -> Sequence[CharacterSpec]:
            existing = params.existing + [_label(c) for c in have]
            prompt = ctx.prompt("character_batch", world=world_text, existing=bullet_list(existing),
                                count=missing)
            # Each ask is memoised: a retry replays the asks already paid for.
            batch = await ctx.step(f"ask-{number}", lambda: ctx.llm("character_batch", prompt, CharacterBatch),
                                   CharacterBatch)
            for i, c in enumerate(batch.characters):
                c.username = slug(c.username, f"character_{params.start_index + len(have) + i}")
            return batch.characters

        async def generate() -> list[CharacterSpec]:
            return await collect(params.count, ask, lambda c: c.username, taken)

        characters = await ctx.step("characters", generate, list[CharacterSpec])
        plan = WorldPlan(users=params.users_total, posts=params.posts_total)
        for offset, character in enumerate(characters):
            index = params.start_index + offset
            ctx.spawn(GenerateCharacter, f"character-{index}", GenerateCharacter.Params(
                index=index, character=character, posts_count=plan.posts_for(index)))
        next_start = params.start_index + len(characters)  # a shortfall moves to the next batch
        if next_start < params.users_total:
            ctx.spawn(GenerateCharacterBatch, f"character-batch-{params.batch_index + 1}", CharacterBatchParams(
                batch_index=params.batch_index + 1, start_index=next_start,
                count=min(BATCH_SIZE, params.users_total - next_start), users_total=params.users_total,
                posts_total=params.posts_total, existing=params.existing + [_label(c) for c in characters]))
        return {"usernames": [c.username for c in characters], "asked": params.count, "made": len(characters)}


def _label(c: CharacterSpec) -> str:
    return f"{c.display_name} (@{c.username}), {c.occupation}"


JOB = GenerateCharacterBatch
