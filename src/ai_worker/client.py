"""Client-side helpers used by `ai-worker send`, `send_message.py`, `ai-worker dev` and `status`:
start a world the way the platform does, and read its progress."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaProducer
from pymongo import AsyncMongoClient
from pymongo.errors import DuplicateKeyError, PyMongoError

from ai_worker.connectivity import (
    KAFKA_ERRORS,
    KAFKA_HINT,
    Unreachable,
    check_mongo,
    kafka_address,
    mongo_client,
    mongo_error,
    start_kafka,
)
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


# World and task ids of `send --idempotency-key KEY` are uuid5(SEND_NAMESPACE, "world/KEY" | "task/KEY").
SEND_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "ai-worker/send")
TOPIC_HINT = "check --topic / KAFKA_TOPIC_TASKS (the worker creates its topics when it starts)"


def ids_for_key(key: str) -> tuple[str, str]:
    """(world_id, task_id) for an idempotency key: the same key always names the same world."""
    return str(uuid.uuid5(SEND_NAMESPACE, f"world/{key}")), str(uuid.uuid5(SEND_NAMESPACE, f"task/{key}"))


@dataclass
class SendOutcome:
    world_id: str
    task_id: str
    inserted: bool  # False: the key's task existed already (nothing new was inserted)
    publish_error: Unreachable | None = None  # inserted, but the event could not be published


async def start_world(
    *, kafka: Sequence[str], mongo_uri: str, database: str, topic: str, prompt: str, users: int, posts: int,
    extra: dict[str, Any] | None = None, idempotency_key: str | None = None,
    kafka_options: Mapping[str, Any] | None = None, timeout_s: float = 5.0,
) -> SendOutcome:
    """Start a world the platform's way: its init task in `tasks`, then its `task_created` event (no key, no
    headers). Kafka is reached first, so an unreachable broker inserts nothing (raises Unreachable). A publish
    that fails after the insert is not an error (`publish_error`): the worker's reconciler publishes pending
    tasks nobody picked up. With `idempotency_key`, the ids come from the key: sending again inserts nothing
    and only publishes the event again."""
    if idempotency_key is not None:
        world_id, task_id = ids_for_key(idempotency_key)
    else:
        world_id, task_id = str(uuid.uuid4()), str(uuid.uuid4())
    doc = init_task_document(task_id=task_id, world_id=world_id, prompt=prompt, users=users, posts=posts,
                             extra=extra)
    producer = AIOKafkaProducer(bootstrap_servers=list(kafka), acks="all",
                                request_timeout_ms=max(int(timeout_s * 1000), 1000), **dict(kafka_options or {}))
    try:
        await start_kafka(producer.start, kafka, timeout_s)
        try:
            await asyncio.wait_for(producer.partitions_for(topic), timeout_s)
        except KAFKA_ERRORS as exc:
            raise Unreachable("Kafka", kafka_address(kafka), f"{type(exc).__name__}: topic {topic!r} not available",
                              TOPIC_HINT) from None
        inserted = True
        client = mongo_client(mongo_uri, timeout_s=timeout_s)
        try:
            await check_mongo(client, mongo_uri, timeout_s)
            tasks = client[database]["tasks"]
            try:
                await tasks.insert_one(doc)
            except DuplicateKeyError:
                if idempotency_key is None:
                    raise
                inserted = False
                existing = await tasks.find_one({"_id": task_id})
                if existing is not None:
                    doc = existing
        except PyMongoError as exc:
            raise mongo_error(mongo_uri, exc, client) from None
        finally:
            await client.close()
        event = {
            "event_type": EventType.TASK_CREATED.value,
            "task_id": task_id,
            "task_type": TaskType.INIT_WORLD_CREATION.value,
            "world_id": world_id,
            "parameters": doc["parameters"],
        }
        outcome = SendOutcome(world_id=world_id, task_id=task_id, inserted=inserted)
        try:
            await asyncio.wait_for(producer.send_and_wait(topic, json.dumps(event, default=str).encode()),
                                   timeout_s)
        except KAFKA_ERRORS as exc:
            outcome.publish_error = Unreachable("Kafka", kafka_address(kafka), exc, KAFKA_HINT)
        return outcome
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.stop(), timeout_s)


async def send_world(
    *, kafka: str, mongo_uri: str, database: str, topic: str, prompt: str, users: int, posts: int,
    extra: dict[str, Any] | None = None, kafka_options: Mapping[str, Any] | None = None, timeout_s: float = 20.0,
) -> tuple[str, str]:
    """`start_world` for programs (the demo, the tests): raises when the event could not be published either.
    Returns (world_id, task_id)."""
    outcome = await start_world(kafka=kafka.split(","), mongo_uri=mongo_uri, database=database, topic=topic,
                                prompt=prompt, users=users, posts=posts, extra=extra, kafka_options=kafka_options,
                                timeout_s=timeout_s)
    if outcome.publish_error is not None:
        raise outcome.publish_error
    return outcome.world_id, outcome.task_id


class EventPublisher:
    """Publishes `task_created` events for tasks that exist already (an operator's retry), bounded in time.
    `start()` raises Unreachable when the broker cannot be reached."""

    def __init__(self, kafka: Sequence[str], topic: str, *, kafka_options: Mapping[str, Any] | None = None,
                 timeout_s: float = 5.0) -> None:
        self._kafka, self._topic, self._timeout_s = kafka, topic, timeout_s
        self._producer = AIOKafkaProducer(bootstrap_servers=list(kafka), acks="all",
                                          request_timeout_ms=max(int(timeout_s * 1000), 1000),
                                          **dict(kafka_options or {}))

    async def start(self) -> None:
        await start_kafka(self._producer.start, self._kafka, self._timeout_s)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._producer.stop(), self._timeout_s)

    async def publish_task(self, task_id: str, task_type: str, world_id: str) -> None:
        event = {"event_type": EventType.TASK_CREATED.value, "task_id": task_id, "task_type": task_type,
                 "world_id": world_id}
        try:
            await asyncio.wait_for(self._producer.send_and_wait(self._topic, json.dumps(event).encode()),
                                   self._timeout_s)
        except KAFKA_ERRORS as exc:
            raise Unreachable("Kafka", kafka_address(self._kafka), exc, KAFKA_HINT) from None


async def world_status(mongo_uri: str, database: str, world_id: str) -> dict[str, Any] | None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri, serverSelectionTimeoutMS=10000)
    try:
        doc: dict[str, Any] | None = await client[database]["world_generation_status"].find_one({"_id": world_id})
        return doc
    finally:
        await client.close()
