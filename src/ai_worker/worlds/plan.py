"""The shape of a world: how many characters and posts, how posts are split over characters, and what the
jobs together predict it will take (tasks, LLM calls, images). Every function is O(1) in the world's size:
a world of 10^9 characters is refused by validation, but nothing here would ever loop over them."""

from __future__ import annotations

from dataclasses import dataclass

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
    is their sum."""

    tasks: int = 0
    llm_calls: int = 0
    images: int = 0

    def __add__(self, other: Prediction) -> Prediction:
        return Prediction(self.tasks + other.tasks, self.llm_calls + other.llm_calls, self.images + other.images)


@dataclass(frozen=True)
class WorldOpening:
    """What the job that starts a world declares about it (validated parameters only)."""

    plan: WorldPlan
    user_prompt: str
    llm_call_limit: int | None = None
    image_call_limit: int | None = None
    budget_usd: float | None = None


__all__ = ["BATCH_SIZE", "Prediction", "WorldOpening", "WorldPlan", "batches"]
