"""`world_parameters` (_id = world id): the generated `WorldDescription` plus `created_at` / `updated_at`.
Every later step reads it and renders it into its prompt, so all content stays consistent."""

from __future__ import annotations

from typing import Final

from ai_worker.content.schemas import WorldDescription
from ai_worker.messaging.events import utcnow
from ai_worker.mongo import Collection, Database

COLLECTION: Final = "world_parameters"


class WorldParametersStore:
    def __init__(self, db: Database) -> None:
        self._col: Collection = db[COLLECTION]

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
