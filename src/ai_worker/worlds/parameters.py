"""`world_parameters` (_id = world id): the generated `WorldDescription` plus `created_at` / `updated_at`.
Every later step reads it and renders it into its prompt, so all content stays consistent."""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

from ai_worker.content.schemas import WorldDescription
from ai_worker.messaging.events import utcnow
from ai_worker.mongo import Collection, Database

COLLECTION: Final = "world_parameters"


CACHE_SIZE: Final = 1024


class WorldParametersStore:
    """Reads are cached per process: a world's description is written once, by its description task, and
    read by every later task of the world (one database read per world and process instead of per task)."""

    def __init__(self, db: Database) -> None:
        self._col: Collection = db[COLLECTION]
        self._cache: OrderedDict[str, WorldDescription] = OrderedDict()

    async def load(self, world_id: str) -> WorldDescription | None:
        cached = self._cache.get(world_id)
        if cached is not None:
            self._cache.move_to_end(world_id)
            return cached
        doc = await self._col.find_one({"_id": world_id})
        if doc is None:
            return None
        world = WorldDescription.model_validate({k: v for k, v in doc.items() if k in WorldDescription.model_fields})
        self._remember(world_id, world)
        return world

    def _remember(self, world_id: str, world: WorldDescription) -> None:
        self._cache[world_id] = world
        self._cache.move_to_end(world_id)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    async def save(self, world_id: str, description: WorldDescription) -> None:
        now = utcnow()
        await self._col.update_one(
            {"_id": world_id},
            {"$set": {**description.model_dump(mode="json"), "updated_at": now}, "$setOnInsert": {"created_at": now}},
            upsert=True,
        )
        self._remember(world_id, description)
