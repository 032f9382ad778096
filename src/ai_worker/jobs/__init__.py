"""The nine job types, one module each; `build_registry()` is the job factory: one line per job."""

from __future__ import annotations

from collections.abc import Mapping

from ai_worker.jobs import (
    character,
    character_avatar,
    character_batch,
    init_world,
    post,
    post_batch,
    post_image,
    world_description,
    world_image,
)
from ai_worker.tasks.registry import JobRegistry

JOBS = (
    init_world.JOB,
    world_description.JOB,
    world_image.JOB,
    character_batch.JOB,
    character.JOB,
    character_avatar.JOB,
    post_batch.JOB,
    post.JOB,
    post_image.JOB,
)


def build_registry(*, max_attempts: Mapping[str, int] | None = None,
                   timeouts_s: Mapping[str, float] | None = None) -> JobRegistry:
    """The registry of this worker's jobs, with the operator's policy overrides (TASK_MAX_ATTEMPTS,
    TASK_TIMEOUTS_S); an override naming an unknown task type is an error."""
    registry = JobRegistry(max_attempts=max_attempts, timeouts_s=timeouts_s)
    for job in JOBS:
        registry.register(job)
    registry.check_overrides()
    return registry
