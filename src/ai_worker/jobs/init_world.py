"""init_world_creation: validate the request and start the pipeline."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ai_worker.messaging.events import TaskType
from ai_worker.tasks.context import JobContext
from ai_worker.tasks.registry import Job

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
    budget_usd: float | None = Field(None, ge=0, description="money cap for this world (default WORLD_BUDGET_USD)")

    @field_validator("user_prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("user_prompt must not be empty")
        return value.strip()


class DescriptionParams(BaseModel):
    user_prompt: str
    users_count: int
    posts_count: int


class InitWorldCreation(Job[InitParams]):
    task_type = TaskType.INIT_WORLD_CREATION
    Params = InitParams

    async def run(self, ctx: JobContext, params: InitParams) -> dict[str, Any]:
        ctx.spawn(
            TaskType.GENERATE_WORLD_DESCRIPTION,
            "description",
            DescriptionParams(user_prompt=params.user_prompt, users_count=params.users_count,
                              posts_count=params.posts_count),
        )
        return {"users_count": params.users_count, "posts_count": params.posts_count}


JOB = InitWorldCreation
