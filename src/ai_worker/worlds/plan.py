"""The shape of a world: how many characters and posts, how posts are split over characters, and what the
jobs together predict it will take (tasks, LLM calls, images). Every function is O(1) in the world's size:
a world of 10^9 characters is refused by validation, but nothing here would ever loop over them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

BATCH_SIZE = 10  # characters per character batch, post ideas per post batch


def batches(count: int, size: int = BATCH_SIZE) -> int:
    """How many batches of at most `size` hold `count` items."""
    return -(-max(0, count) // size)


@dataclass(frozen=True)
class WorldPlan:
    users: int
    posts: int

    def posts_for(self, index: int) -> int:
        """Post totals split over characters: they sum to `posts` and differ by at most one; the first
        `posts mod users` characters get the extra post (with fewer posts than characters, the first
        `posts` characters get one each and the rest none)."""
        if self.users <= 0 or index < 0 or index >= self.users:
            return 0
        base, extra = divmod(self.posts, self.users)
        return base + (1 if index < extra else 0)

    def post_batches(self) -> int:
        """Post batches of all characters together: each character's posts come in batches of 10."""
        if self.users <= 0:
            return 0
        base, extra = divmod(self.posts, self.users)
        return extra * batches(base + 1) + (self.users - extra) * batches(base)

    def character_batches(self) -> int:
        return batches(self.users)


@dataclass(frozen=True)
class Prediction:
    """What some part of a world is expected to take; jobs declare theirs (`Job.predict`), and the world's
    is their sum.

    `llm_calls_by_step` / `images_by_step` say which step (the registry's step names: world_description,
    character_batch, post_batch, post; world_header, world_icon, avatar, post_image) the calls are, so a
    cost can be put on them (`providers.cost`). The totals `llm_calls` / `images` follow them: left at 0
    they are the sums; a larger total keeps calls no step claims (priced as the default model's); a
    smaller one is an error. Zero counts are dropped. Everything is O(number of steps)."""

    tasks: int = 0
    llm_calls: int = 0
    images: int = 0
    llm_calls_by_step: Mapping[str, int] = field(default_factory=dict)
    images_by_step: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for total_name, by_name in (("llm_calls", "llm_calls_by_step"), ("images", "images_by_step")):
            by_step = {step: int(n) for step, n in getattr(self, by_name).items() if n}
            if any(n < 0 for n in by_step.values()):
                raise ValueError(f"{by_name} has a negative count: {by_step}")
            named = sum(by_step.values())
            total = getattr(self, total_name)
            if total == 0:
                object.__setattr__(self, total_name, named)
            elif total < named:
                raise ValueError(f"{total_name}={total} is less than the {named} calls of {by_name}")
            object.__setattr__(self, by_name, MappingProxyType(by_step))

    @property
    def unattributed_llm_calls(self) -> int:
        """LLM calls no step claims."""
        return self.llm_calls - sum(self.llm_calls_by_step.values())

    @property
    def unattributed_images(self) -> int:
        """Images no step claims."""
        return self.images - sum(self.images_by_step.values())

    def __add__(self, other: Prediction) -> Prediction:
        return Prediction(self.tasks + other.tasks, self.llm_calls + other.llm_calls, self.images + other.images,
                          _merge(self.llm_calls_by_step, other.llm_calls_by_step),
                          _merge(self.images_by_step, other.images_by_step))


def _merge(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    merged = dict(a)
    for step, n in b.items():
        merged[step] = merged.get(step, 0) + n
    return merged


@dataclass(frozen=True)
class WorldOpening:
    """What the job that starts a world declares about it (validated parameters only)."""

    plan: WorldPlan
    user_prompt: str
    llm_call_limit: int | None = None
    image_call_limit: int | None = None
    budget_usd: float | None = None


__all__ = ["BATCH_SIZE", "Prediction", "WorldOpening", "WorldPlan", "batches"]
