"""init_world_creation: validate the request and start the pipeline."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ai_worker.jobs.context import Job, JobContext
from ai_worker.jobs.world_description import GenerateWorldDescription
from ai_worker.messaging.events import TaskType
from ai_worker.worlds.plan import Prediction, WorldOpening, WorldPlan

MAX_USERS = 500
MAX_POSTS = 5000


class InitParams(BaseModel):
    # The platform also sends created_at (a string) and test scripts test_mode: accepted and ignored.
    model_config = ConfigDict(extra="ignore")

    user_prompt: str = Field(min_length=1, max_length=4000)
    users_count: int = Field(10, ge=1, le=MAX_USERS)
    posts_count: int = Field(50, ge=0, le=MAX_POSTS)
    api_call_limits_llm: int | None = Field(None, ge=1)
    api_call_limits_images: int | None = Field(None, ge=1)
    budget_usd: float | None = Field(None, ge=0, description="money cap for this world (default: the worker's "
                                     "WORLD_BUDGET_USD, else WORLD_BUDGET_FACTOR x its predicted cost)")

    @field_validator("user_prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("user_prompt must not be empty")
        return value.strip()


class InitWorldCreation(Job[InitParams]):
    task_type = TaskType.INIT_WORLD_CREATION
    Params = InitParams
    stage = "initializing"
    max_attempts = 4
    timeout_s = 60.0
    world_level = True
    priority = 100
    opens_world = True

    @classmethod
    def predict(cls, plan: WorldPlan) -> Prediction:
        return Prediction(tasks=1)

    def world_opening(self, params: InitParams) -> WorldOpening:
        return WorldOpening(plan=WorldPlan(users=params.users_count, posts=params.posts_count),
                            user_prompt=params.user_prompt, llm_call_limit=params.api_call_limits_llm,
                            image_call_limit=params.api_call_limits_images, budget_usd=params.budget_usd)

    async def run(self, ctx: JobContext, params: InitParams) -> dict[str, Any]:
        ctx.spawn(GenerateWorldDescription, "description", GenerateWorldDescription.Params(
            user_prompt=params.user_prompt, users_count=params.users_count, posts_count=params.posts_count))
        return {"users_count": params.users_count, "posts_count": params.posts_count}


JOB = InitWorldCreation
