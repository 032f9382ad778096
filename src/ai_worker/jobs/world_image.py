"""generate_world_image: header (1024x512) and icon (512x512) -> Media -> UpdateWorldImage."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ai_worker.content.world import image_style
from ai_worker.images.upload import UploadedMedia
from ai_worker.jobs.context import Job, JobContext
from ai_worker.messaging.events import TaskType
from ai_worker.platform.clients import MediaKind
from ai_worker.worlds.plan import Prediction, WorldPlan


class WorldImageParams(BaseModel):
    pass


class GenerateWorldImage(Job[WorldImageParams]):
    task_type = TaskType.GENERATE_WORLD_IMAGE
    Params = WorldImageParams
    stage = "world_image"
    max_attempts = 4
    timeout_s = 900.0
    priority = 10
    pool = "image"

    @classmethod
    def predict(cls, plan: WorldPlan) -> Prediction:
        return Prediction(tasks=1, images_by_step={"world_header": 1, "world_icon": 1})

    async def run(self, ctx: JobContext, params: WorldImageParams) -> dict[str, Any]:
        world = await ctx.world()
        style = image_style(world)
        header = await ctx.step("header", lambda: ctx.image_upload(
            step="world_header", prompt=f"{world.header_image_prompt}\n{style}", width=1024, height=512,
            filename=f"world_{ctx.world_id}_header.png", media_type=MediaKind.WORLD_HEADER), UploadedMedia)
        icon = await ctx.step("icon", lambda: ctx.image_upload(
            step="world_icon", prompt=f"{world.icon_image_prompt}\n{style}", width=512, height=512,
            filename=f"world_{ctx.world_id}_icon.png", media_type=MediaKind.WORLD_ICON), UploadedMedia)

        async def update() -> bool:
            await ctx.platform.worlds.update_world_image(world_id=ctx.world_id, image_uuid=header.media_id,
                                                         icon_uuid=icon.media_id,
                                                         call=ctx.call("update_world_image"))
            return True

        await ctx.step("update_world_image", update, bool)
        return {"header_media_id": header.media_id, "icon_media_id": icon.media_id, "header_url": header.url,
                "icon_url": icon.url}


JOB = GenerateWorldImage
