"""Shared world-context helpers for jobs: the world_parameters store, exact-count batches, naming."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from ai_worker.content.schemas import WorldDescription
from ai_worker.errors import InvalidOutput
from ai_worker.messaging.events import utcnow

BATCH_SIZE = 10
MAX_ASKS = 3
T = TypeVar("T")

WORLD_PARAMETERS = "world_parameters"


class MongoWorldStore:
    """`world_parameters` (_id = world id): the WorldDescription plus created_at / updated_at."""

    def __init__(self, db: Any) -> None:
        self._col = db[WORLD_PARAMETERS]

    async def load(self, world_id: str) -> WorldDescription | None:
        doc = await self._col.find_one({"_id": world_id})
        if doc is None:
            return None
        return WorldDescription.model_validate({k: v for k, v in doc.items() if k in WorldDescription.model_fields})

    async def save(self, world_id: str, description: WorldDescription) -> None:
        now = utcnow()
        await self._col.update_one(
            {"_id": world_id},
            {"$set": {**description.model_dump(mode="json"), "updated_at": now}, "$setOnInsert": {"created_at": now}},
            upsert=True,
        )


async def exact_count(
    count: int,
    ask: Callable[[int, list[T]], Awaitable[Sequence[T]]],
    key: Callable[[T], str],
    taken: set[str],
) -> list[T]:
    """Ask for `count` items, dropping duplicates (by key, against `taken` and each other), trimming
    surplus and asking again for a shortfall, at most MAX_ASKS times."""
    items: list[T] = []
    seen = set(taken)
    for _ in range(MAX_ASKS):
        missing = count - len(items)
        if missing <= 0:
            break
        for item in await ask(missing, items):
            k = key(item)
            if k in seen:
                continue
            seen.add(k)
            items.append(item)
    if len(items) < count:
        raise InvalidOutput(f"asked {MAX_ASKS} times for {count} items, got {len(items)} usable")
    return items[:count]


def slug(text: str, fallback: str) -> str:
    s = re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")[:24]
    return s or fallback


def bullet_list(lines: Sequence[str], empty: str = "(none yet)") -> str:
    return "\n".join(f"- {line}" for line in lines) if lines else empty
