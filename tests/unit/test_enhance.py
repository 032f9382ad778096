"""Image prompt enhancement (IMAGE_PROMPT_ENHANCE): the PromptEnhancer and its use by JobContext.image_upload."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ai_worker.content.prompts import PromptLibrary
from ai_worker.content.schemas import EnhancedImagePrompt, WorldDescription
from ai_worker.errors import BudgetExceeded, InvalidOutput, ProviderRejected, ProviderUnavailable, WorkerError
from ai_worker.images.enhance import PromptEnhancer
from ai_worker.jobs.context import JobContext, Services
from ai_worker.llm.client import Prompt
from ai_worker.providers.history import CallContext
from ai_worker.tasks.model import TaskDoc

PROMPTS = PromptLibrary(Path(__file__).parents[2] / "prompts")
CALL = CallContext(task_id="task-1", world_id="world-1", request_type="image_prompt", attempt=1)


@dataclass
class Result:
    value: EnhancedImagePrompt


@dataclass
class StructuredCall:
    prompt: Any
    schema: type[Any]
    call: CallContext
    step: str


class FakeLLM:
    """Answers `structured` with `reply` (or raises `error`) and records every call."""

    def __init__(self, reply: str = "", error: Exception | None = None) -> None:
        self.reply = reply
        self.error = error
        self.calls: list[StructuredCall] = []

    async def structured(self, prompt: Any, schema: type[Any], call: CallContext, *, step: str) -> Result:
        self.calls.append(StructuredCall(prompt, schema, call, step))
        if self.error is not None:
            raise self.error
        return Result(EnhancedImagePrompt(prompt=self.reply))


# --- PromptEnhancer ---------------------------------------------------------------------------------------


async def test_disabled_returns_the_prompt_without_calling_the_llm() -> None:
    llm = FakeLLM(reply="something else")
    enhancer = PromptEnhancer(llm, PROMPTS, enabled=False)
    assert await enhancer("a red fox in the snow", 512, 512, CALL) == "a red fox in the snow"
    assert llm.calls == []


async def test_enabled_renders_the_template_and_returns_the_stripped_rewrite() -> None:
    llm = FakeLLM(reply="  A red fox in deep snow, low winter sun, soft rim light.  \n")
    enhancer = PromptEnhancer(llm, PROMPTS, enabled=True)
    out = await enhancer("a red fox in the snow", 640, 480, CALL)
    assert out == "A red fox in deep snow, low winter sun, soft rim light."
    expected = PROMPTS.render("image_prompt", prompt="a red fox in the snow", width=640, height=480)
    assert isinstance(expected, Prompt)
    assert "a red fox in the snow" in expected.user and "640 x 480" in expected.user
    assert len(llm.calls) == 1
    sent = llm.calls[0]
    assert sent.prompt == expected
    assert sent.schema is EnhancedImagePrompt
    assert sent.call == CALL
    assert sent.step == "image_prompt"


@pytest.mark.parametrize("reply", ["", "   \n\t "])
async def test_an_empty_rewrite_falls_back_to_the_original(reply: str) -> None:
    llm = FakeLLM(reply=reply)
    assert await PromptEnhancer(llm, PROMPTS, enabled=True)("a lighthouse", 256, 256, CALL) == "a lighthouse"
    assert len(llm.calls) == 1


@pytest.mark.parametrize("error", [InvalidOutput("not json"), ProviderUnavailable("503"),
                                   ProviderRejected("400 bad request")])
async def test_a_failed_rewrite_keeps_the_original_prompt(error: WorkerError) -> None:
    llm = FakeLLM(error=error)
    assert await PromptEnhancer(llm, PROMPTS, enabled=True)("a lighthouse", 256, 256, CALL) == "a lighthouse"
    assert len(llm.calls) == 1


async def test_budget_refusal_is_raised() -> None:
    llm = FakeLLM(error=BudgetExceeded("world budget spent"))
    with pytest.raises(BudgetExceeded, match="world budget spent"):
        await PromptEnhancer(llm, PROMPTS, enabled=True)("a lighthouse", 256, 256, CALL)


async def test_other_exceptions_are_not_swallowed() -> None:
    llm = FakeLLM(error=RuntimeError("bug"))
    with pytest.raises(RuntimeError, match="bug"):
        await PromptEnhancer(llm, PROMPTS, enabled=True)("a lighthouse", 256, 256, CALL)


# --- JobContext.image_upload ------------------------------------------------------------------------------


@dataclass
class Generated:
    prompt: str
    width: int
    height: int
    call: CallContext


class FakeImages:
    def __init__(self) -> None:
        self.calls: list[Generated] = []

    async def generate(self, prompt: str, width: int, height: int, call: CallContext) -> str:
        self.calls.append(Generated(prompt, width, height, call))
        return f"image-bytes-{len(self.calls)}"


class FakeMedia:
    def __init__(self) -> None:
        self.uploads: list[dict[str, Any]] = []

    async def upload(self, **kwargs: Any) -> str:
        self.uploads.append(kwargs)
        return "media-1"


class FakeEnhance:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, CallContext]] = []

    async def __call__(self, prompt: str, width: int, height: int, call: CallContext) -> str:
        self.calls.append((prompt, width, height, call))
        return f"enhanced: {prompt}"


class NoWorlds:
    async def load(self, world_id: str) -> WorldDescription | None:
        return None

    async def save(self, world_id: str, description: WorldDescription) -> None:
        return None


class NoSteps:
    async def still_owned(self, task: TaskDoc, worker_id: str) -> bool:
        return True

    async def save_step(self, task: TaskDoc, worker_id: str, name: str, value: Any) -> bool:
        return True


def job_context(images: FakeImages, media: FakeMedia, enhance: Any) -> JobContext:
    task = TaskDoc.model_validate({"_id": "task-1", "type": "generate_post", "world_id": "world-1",
                                   "status": "in_progress", "attempt_count": 2})
    services = Services(llm=None, images=images, media=media, platform=None, prompts=None,  # type: ignore[arg-type]
                        worlds=NoWorlds(), enhance=enhance)
    return JobContext(task=task, worker_id="worker-1", max_attempts=3, services=services, steps=NoSteps(),
                      is_cancelled=lambda: False)


async def test_image_upload_generates_from_the_enhanced_prompt() -> None:
    images, media, enhance = FakeImages(), FakeMedia(), FakeEnhance()
    ctx = job_context(images, media, enhance)
    media_id = await ctx.image_upload(step="post_image", prompt="a harbour at dawn", width=1024, height=768,
                                      filename="post.png", media_type="post")
    assert media_id.media_id == "media-1"
    assert enhance.calls == [("a harbour at dawn", 1024, 768, CallContext(
        task_id="task-1", world_id="world-1", request_type="image_prompt", attempt=2))]
    assert [(g.prompt, g.width, g.height) for g in images.calls] == [("enhanced: a harbour at dawn", 1024, 768)]
    assert images.calls[0].call.request_type == "post_image"
    assert len(media.uploads) == 1 and media.uploads[0]["image"] == "image-bytes-1"


async def test_image_upload_with_the_real_enhancer_calls_the_llm_for_step_image_prompt() -> None:
    images, media = FakeImages(), FakeMedia()
    llm = FakeLLM(reply="A quiet harbour at dawn, pastel sky, wide shot.")
    ctx = job_context(images, media, PromptEnhancer(llm, PROMPTS, enabled=True))
    assert (await ctx.image_upload(step="avatar", prompt="a harbour", width=512, height=512,
                                  filename="a.png", media_type="avatar", character_id="char-1")).media_id == "media-1"
    assert [c.step for c in llm.calls] == ["image_prompt"]
    assert llm.calls[0].call.request_type == "image_prompt" and llm.calls[0].call.task_id == "task-1"
    assert [g.prompt for g in images.calls] == ["A quiet harbour at dawn, pastel sky, wide shot."]


async def test_image_upload_without_an_enhancer_uses_the_original_prompt() -> None:
    images, media = FakeImages(), FakeMedia()
    ctx = job_context(images, media, None)
    assert (await ctx.image_upload(step="world_icon", prompt="a compass rose", width=256, height=256,
                                  filename="icon.png", media_type="icon")).media_id == "media-1"
    assert [g.prompt for g in images.calls] == ["a compass rose"]
    assert images.calls[0].call.request_type == "world_icon"
