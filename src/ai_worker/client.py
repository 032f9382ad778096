"""Client-side helpers used by `ai-worker send`, `send_message.py`, `ai-worker dev` and `status`:
start a world the way the platform does, and read its progress."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaProducer
from pymongo import AsyncMongoClient

from ai_worker.messaging.events import EventType, TaskType


def init_task_document(
    *, task_id: str, world_id: str, prompt: str, users: int, posts: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Exactly the keys the platform's world service inserts for the first task of a world."""
    now = datetime.now(UTC)
    parameters: dict[str, Any] = {
        "user_prompt": prompt,
        "users_count": users,
        "posts_count": posts,
        "created_at": now.isoformat(),
        **(extra or {}),
    }
    return {
        "_id": task_id,
        "type": TaskType.INIT_WORLD_CREATION.value,
        "world_id": world_id,
        "status": "pending",
        "worker_id": None,
        "parameters": parameters,
        "result": None,
        "error": None,
        "attempt_count": 0,
        "created_at": now,
        "updated_at": now,
    }


async def send_world(
    *, kafka: str, mongo_uri: str, database: str, topic: str, prompt: str, users: int, posts: int,
    extra: dict[str, Any] | None = None,
) -> tuple[str, str]:
    """Insert the init task and publish its event (the platform's shape, no key, no headers).
    Returns (world_id, task_id)."""
    world_id, task_id = str(uuid.uuid4()), str(uuid.uuid4())
    doc = init_task_document(task_id=task_id, world_id=world_id, prompt=prompt, users=users, posts=posts,
                             extra=extra)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri, serverSelectionTimeoutMS=10000)
    try:
        await client[database]["tasks"].insert_one(doc)
    finally:
        await client.close()
    event = {
        "event_type": EventType.TASK_CREATED.value,
        "task_id": task_id,
        "task_type": TaskType.INIT_WORLD_CREATION.value,
        "world_id": world_id,
        "parameters": doc["parameters"],
    }
    producer = AIOKafkaProducer(bootstrap_servers=kafka.split(","), acks="all", request_timeout_ms=20000)
    await producer.start()
    try:
        await producer.send_and_wait(topic, json.dumps(event).encode())
    finally:
        await producer.stop()
    return world_id, task_id


async def world_status(mongo_uri: str, database: str, world_id: str) -> dict[str, Any] | None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri, serverSelectionTimeoutMS=10000)
    try:
        doc: dict[str, Any] | None = await client[database]["world_generation_status"].find_one({"_id": world_id})
        return doc
    finally:
        await client.close()
