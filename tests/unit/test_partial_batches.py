"""A batch that gets fewer usable items than it asked for keeps them and hands the shortfall to the next
batch of its chain, so the world's counts stay exact; each ask is memoised, so a retry pays for none again."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from ai_worker.content.prompts import PromptLibrary
from ai_worker.content.schemas import CharacterBatch, CharacterSpec, PostBatch, PostIdea, WorldDescription
from ai_worker.errors import InvalidOutput
from ai_worker.jobs.character_batch import GenerateCharacterBatch
from ai_worker.jobs.context import JobContext, Services
from ai_worker.jobs.post_batch import GeneratePostBatch
from ai_worker.tasks.model import TaskDoc

PROMPTS = PromptLibrary(Path(__file__).parents[2] / "prompts")
WORLD = WorldDescription(name="W", language="English", summary="s", setting="s", history="h", society="s",
                         locations=[], themes=["t"], tone="t", header_image_prompt="h", icon_image_prompt="i")


@dataclass
class Result:
    value: BaseModel


class ShortLLM:
    """Answers every batch one item short of what it was asked (never fewer than `floor`)."""

    def __init__(self, floor: int = 0) -> None:
        self.calls = 0
        self.floor = floor

    async def structured(self, prompt: Any, schema: type[BaseModel], call: Any, *, step: str) -> Result:
        self.calls += 1
        asked = int(prompt.user.split("exactly ")[1].split()[0]) if "exactly " in prompt.user else 10
        n = max(self.floor, asked - 1)
        if schema is CharacterBatch:
            return Result(CharacterBatch(characters=[_character(f"{self.calls}_{i}") for i in range(n)]))
        return Result(PostBatch(posts=[PostIdea(topic=f"topic {self.calls}.{i}", angle="a") for i in range(n)]))


def _character(tag: str) -> CharacterSpec:
    return CharacterSpec(username=f"user_{tag}", display_name=f"User {tag}", bio="b", personality="p",
                         occupation="o", interests=["i"], speaking_style="s", avatar_prompt="a")


class Worlds:
    async def load(self, world_id: str) -> WorldDescription:
        return WORLD


class Steps:
    def __init__(self) -> None:
        self.saved: dict[str, Any] = {}

    async def still_owned(self, task: TaskDoc, worker_id: str) -> bool:
        return True

    async def save_step(self, task: TaskDoc, worker_id: str, name: str, value: Any) -> bool:
        self.saved[name] = value
        return True


def context(llm: ShortLLM, steps: Steps, task_type: str, saved: dict[str, Any] | None = None) -> JobContext:
    task = TaskDoc.model_validate({"_id": "t1", "type": task_type, "world_id": "w1", "status": "in_progress",
                                   "attempt_count": 1, "steps": dict(saved or {})})
    services = Services(llm=llm, images=None, media=None, platform=None, prompts=PROMPTS,  # type: ignore[arg-type]
                        worlds=Worlds())  # type: ignore[arg-type]
    return JobContext(services=services, task=task, worker_id="w", max_attempts=4, steps=steps,
                      is_cancelled=lambda: False)


def _prompt_count_is_parsed() -> None:
    rendered = PROMPTS.render("character_batch", world="w", existing="-", count=7)
    assert "exactly 7" in rendered.user


async def test_a_short_character_batch_keeps_what_it_got_and_the_next_batch_starts_there() -> None:
    _prompt_count_is_parsed()
    llm, steps = ShortLLM(), Steps()
    ctx = context(llm, steps, "generate_character_batch")
    params = GenerateCharacterBatch.Params(batch_index=0, start_index=0, count=10, users_total=25, posts_total=50)
    result = await GenerateCharacterBatch().run(ctx, params)
    # 10 asked: 9, then 1 asked: 0, then 1 asked: 0 -> keeps 9 after three asks.
    assert (result["asked"], result["made"]) == (10, 9) and llm.calls == 3
    characters = [c for c in ctx.children if c.type == "generate_character"]
    assert [c.parameters["index"] for c in characters] == list(range(9))
    (next_batch,) = [c for c in ctx.children if c.type == "generate_character_batch"]
    assert (next_batch.parameters["start_index"], next_batch.parameters["count"]) == (9, 10)
    assert len(next_batch.parameters["existing"]) == 9
    assert {"ask-1", "ask-2", "ask-3", "characters"} <= set(steps.saved)

    # A retry of the same attempt replays the memoised asks: no new call.
    again = ShortLLM()
    retry_ctx = context(again, Steps(), "generate_character_batch",
                        {k: v for k, v in steps.saved.items() if k.startswith("ask-")})
    assert (await GenerateCharacterBatch().run(retry_ctx, params))["made"] == 9 and again.calls == 0


async def test_the_last_character_batch_short_spawns_one_more_for_the_shortfall() -> None:
    ctx = context(ShortLLM(), Steps(), "generate_character_batch")
    params = GenerateCharacterBatch.Params(batch_index=2, start_index=20, count=5, users_total=25, posts_total=50)
    await GenerateCharacterBatch().run(ctx, params)
    (next_batch,) = [c for c in ctx.children if c.type == "generate_character_batch"]
    assert (next_batch.parameters["start_index"], next_batch.parameters["count"]) == (24, 1)


async def test_a_short_post_batch_hands_the_shortfall_to_the_next() -> None:
    ctx = context(ShortLLM(), Steps(), "generate_post_batch")
    params = GeneratePostBatch.Params(character_id="c1", character_index=0, character=_character("x"), batch_index=0,
                                      start_index=0, count=7, total=7)
    result = await GeneratePostBatch().run(ctx, params)
    assert result["made"] == 6
    assert [c.parameters["post_index"] for c in ctx.children if c.type == "generate_post"] == list(range(6))
    (next_batch,) = [c for c in ctx.children if c.type == "generate_post_batch"]
    assert (next_batch.parameters["start_index"], next_batch.parameters["count"]) == (6, 1)


async def test_a_batch_with_nothing_usable_fails_and_is_retried() -> None:
    ctx = context(ShortLLM(), Steps(), "generate_post_batch")
    params = GeneratePostBatch.Params(character_id="c1", character_index=0, character=_character("x"), batch_index=0,
                                      start_index=0, count=1, total=1)
    with pytest.raises(InvalidOutput, match="none usable"):
        await GeneratePostBatch().run(ctx, params)
