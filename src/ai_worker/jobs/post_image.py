"""generate_post_image: a 512x512 picture -> Media -> CreateAIPost. Every post gets published: when
the picture cannot be made on the last attempt, the post goes out without one."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ai_worker.content.world import image_style
from ai_worker.images.upload import UploadedMedia
from ai_worker.jobs.context import Job, JobContext
from ai_worker.messaging.events import TaskType
from ai_worker.platform.clients import MediaKind
from ai_worker.tasks.context import LeaseLost
from ai_worker.worlds.plan import Prediction, WorldPlan


class PostImageParams(BaseModel):
    character_id: str
    post_index: int
    caption: str
    image_prompt: str
    tags: list[str]


class GeneratePostImage(Job[PostImageParams]):
    task_type = TaskType.GENERATE_POST_IMAGE
    Params = PostImageParams
    stage = "posts"
    timeout_s = 900.0
    priority = 10
    pool = "image"
    produces = "posts"

    @classmethod
    def predict(cls, plan: WorldPlan) -> Prediction:
        return Prediction(tasks=plan.posts, images_by_step={"post_image": plan.posts})

    async def run(self, ctx: JobContext, params: PostImageParams) -> dict[str, Any]:
        world = await ctx.world()
        image_error: str | None = None

        async def make_image() -> UploadedMedia:
            nonlocal image_error
            try:
                return await ctx.image_upload(
                    step="post_image", prompt=f"{params.image_prompt}\n{image_style(world)}", width=512,
                    height=512, filename=f"post_{ctx.world_id}_{params.character_id}_{params.post_index}.png",
                    media_type=MediaKind.POST_IMAGE, character_id=params.character_id)
            except Exception as exc:
                if isinstance(exc, LeaseLost) or not ctx.is_last_attempt:
                    raise
                image_error = f"{type(exc).__name__}: {exc}"
                ctx.log.warning("post image failed on the last attempt; publishing without it",
                                error=image_error)
                return UploadedMedia(media_id="")

        media = await ctx.step("media_id", make_image, UploadedMedia)

        async def publish() -> str:
            post_id: str = await ctx.platform.posts.create_ai_post(
                character_id=params.character_id, caption=params.caption, media_id=media.media_id,
                world_id=ctx.world_id, tags=params.tags, request_id=ctx.request_id("create_post"),
                call=ctx.call("create_post"))
            return post_id

        post_id = await ctx.step("post_id", publish, str)
        return {"post_id": post_id, "media_id": media.media_id or None, "media_url": media.url or None,
                "image_error": image_error}


JOB = GeneratePostImage
