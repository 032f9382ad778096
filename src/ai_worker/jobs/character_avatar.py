"""generate_character_avatar: a 512x512 portrait -> Media -> UpdateCharacter."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ai_worker.content.world import image_style
from ai_worker.images.upload import UploadedMedia
from ai_worker.jobs.context import Job, JobContext
from ai_worker.messaging.events import TaskType
from ai_worker.platform.clients import MediaKind
from ai_worker.worlds.plan import Prediction, WorldPlan


class AvatarParams(BaseModel):
    character_id: str
    index: int
    username: str
    avatar_prompt: str


class GenerateCharacterAvatar(Job[AvatarParams]):
    task_type = TaskType.GENERATE_CHARACTER_AVATAR
    Params = AvatarParams
    stage = "characters"
    timeout_s = 900.0
    priority = 10
    pool = "image"

    @classmethod
    def predict(cls, plan: WorldPlan) -> Prediction:
        return Prediction(tasks=plan.users, images_by_step={"avatar": plan.users})

    async def run(self, ctx: JobContext, params: AvatarParams) -> dict[str, Any]:
        world = await ctx.world()
        avatar = await ctx.step("avatar_media_id", lambda: ctx.image_upload(
            step="avatar", prompt=f"Portrait avatar. {params.avatar_prompt}\n{image_style(world)}",
            width=512, height=512, filename=f"avatar_{ctx.world_id}_{params.username}_{params.index}.png",
            media_type=MediaKind.CHARACTER_AVATAR, character_id=params.character_id), UploadedMedia)

        async def update() -> bool:
            await ctx.platform.characters.update_character(
                character_id=params.character_id, avatar_media_id=avatar.media_id, call=ctx.call("update_character"))
            return True

        await ctx.step("update_character", update, bool)
        return {"avatar_media_id": avatar.media_id, "avatar_url": avatar.url}


JOB = GenerateCharacterAvatar
