"""generate_post_image on its last attempt: a picture that cannot be made does not stop the post, which is
published without media and says why in the task's result. Before the last attempt the error is raised
(the engine retries), and a lost lease is never swallowed."""

from __future__ import annotations

from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from ai_worker.content.schemas import WorldDescription
from ai_worker.errors import ProviderUnavailable
from ai_worker.jobs.context import JobContext, Services
from ai_worker.jobs.post_image import GeneratePostImage, PostImageParams
from ai_worker.tasks.context import LeaseLost
from ai_worker.tasks.model import TaskDoc


class Images:
    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.calls = 0

    async def generate(self, prompt: str, width: int, height: int, call: Any) -> Any:
        self.calls += 1
        raise self.error


class Posts:
    def __init__(self) -> None:
        self.created: list[dict[str, Any]] = []

    async def create_ai_post(self, **fields: Any) -> str:
        self.created.append(fields)
        return f"post-{len(self.created)}"


class Platform:
    def __init__(self) -> None:
        self.posts = Posts()


class Worlds:
    async def load(self, world_id: str) -> WorldDescription:
        return WorldDescription.model_construct(tone="misty")


class Steps:
    def __init__(self) -> None:
        self.saved: dict[str, Any] = {}

    async def still_owned(self, task: TaskDoc, worker_id: str) -> bool:
        return True

    async def save_step(self, task: TaskDoc, worker_id: str, name: str, value: Any) -> bool:
        self.saved[name] = value
        return True


PARAMS = PostImageParams(character_id="c1", post_index=3, caption="Hello", image_prompt="a lantern", tags=["x"])


def context(images: Images, platform: Platform, steps: Steps, *, attempt: int, max_attempts: int = 2) -> JobContext:
    task = TaskDoc.model_validate({"_id": "t1", "type": "generate_post_image", "world_id": "w1",
                                   "status": "in_progress", "attempt_count": attempt})
    services = Services(llm=cast(Any, None), images=cast(Any, images), media=cast(Any, None),
                        platform=cast(Any, platform), prompts=cast(Any, None), worlds=cast(Any, Worlds()))
    return JobContext(services=services, task=task, worker_id="w", max_attempts=max_attempts, steps=steps,
                      is_cancelled=lambda: False)


async def test_last_attempt_publishes_the_post_without_media() -> None:
    images, platform, steps = Images(ProviderUnavailable("HTTP 503")), Platform(), Steps()
    with capture_logs() as logs:
        result = await GeneratePostImage().run(context(images, platform, steps, attempt=2), PARAMS)
    assert images.calls == 1
    assert platform.posts.created == [{
        "character_id": "c1", "caption": "Hello", "media_id": "", "world_id": "w1", "tags": ["x"],
        "request_id": platform.posts.created[0]["request_id"], "call": platform.posts.created[0]["call"]}]
    assert result == {"post_id": "post-1", "media_id": None, "media_url": None,
                      "image_error": "ProviderUnavailable: HTTP 503"}
    assert steps.saved == {"media_id": {"media_id": "", "url": ""}, "post_id": "post-1"}
    warned = [e for e in logs if e["event"].startswith("post image failed on the last attempt")]
    assert len(warned) == 1 and warned[0]["log_level"] == "warning"


async def test_earlier_attempts_raise_so_the_engine_retries() -> None:
    images, platform, steps = Images(ProviderUnavailable("HTTP 503")), Platform(), Steps()
    with pytest.raises(ProviderUnavailable):
        await GeneratePostImage().run(context(images, platform, steps, attempt=1), PARAMS)
    assert platform.posts.created == [] and steps.saved == {}


async def test_a_lost_lease_is_not_turned_into_a_post_without_media() -> None:
    images, platform, steps = Images(LeaseLost("reclaimed")), Platform(), Steps()
    with pytest.raises(LeaseLost):
        await GeneratePostImage().run(context(images, platform, steps, attempt=2), PARAMS)
    assert platform.posts.created == []
