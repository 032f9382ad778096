"""generate_post: the post's text, tags and picture description, in the character's voice."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ai_worker.content.schemas import CharacterSpec, PostContent, PostIdea
from ai_worker.content.world import render_character, render_world
from ai_worker.jobs.context import Job, JobContext
from ai_worker.jobs.post_image import GeneratePostImage
from ai_worker.messaging.events import TaskType
from ai_worker.worlds.plan import Prediction, WorldPlan


class PostParams(BaseModel):
    character_id: str
    character: CharacterSpec
    post_index: int
    idea: PostIdea


class GeneratePost(Job[PostParams]):
    task_type = TaskType.GENERATE_POST
    Params = PostParams
    stage = "posts"
    timeout_s = 600.0
    priority = 50
    pool = "llm"

    @classmethod
    def predict(cls, plan: WorldPlan) -> Prediction:
        return Prediction(tasks=plan.posts, llm_calls_by_step={"post": plan.posts})

    async def run(self, ctx: JobContext, params: PostParams) -> dict[str, Any]:
        world_text = render_world(await ctx.world())
        prompt = ctx.prompt("post", world=world_text, character=render_character(params.character),
                            topic=params.idea.topic, angle=params.idea.angle, post_number=params.post_index + 1)
        content = await ctx.step("content", lambda: ctx.llm("post", prompt, PostContent), PostContent)
        tags = [t.lstrip("#").strip() for t in content.tags if t.strip("# ")][:5]
        ctx.spawn(GeneratePostImage, "image", GeneratePostImage.Params(
            character_id=params.character_id, post_index=params.post_index, caption=content.caption,
            image_prompt=content.image_prompt, tags=tags))
        return {"caption": content.caption}


JOB = GeneratePost
