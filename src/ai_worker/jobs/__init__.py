"""The nine job types, one module each; `build_registry()` is the job factory."""

from __future__ import annotations

from ai_worker.tasks.registry import JobRegistry


def build_registry() -> JobRegistry:
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

    registry = JobRegistry()
    for module in (init_world, world_description, world_image, character_batch, character,
                   character_avatar, post_batch, post, post_image):
        registry.register(module.JOB)
    return registry
