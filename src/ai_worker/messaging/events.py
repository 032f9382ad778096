"""Kafka event models (CONTRACTS.md, "Kafka")."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_EVENT_BYTES = 64 * 1024


class TaskType(StrEnum):
    INIT_WORLD_CREATION = "init_world_creation"
    GENERATE_WORLD_DESCRIPTION = "generate_world_description"
    GENERATE_WORLD_IMAGE = "generate_world_image"
    GENERATE_CHARACTER_BATCH = "generate_character_batch"
    GENERATE_CHARACTER = "generate_character"
    GENERATE_CHARACTER_AVATAR = "generate_character_avatar"
    GENERATE_POST_BATCH = "generate_post_batch"
    GENERATE_POST = "generate_post"
    GENERATE_POST_IMAGE = "generate_post_image"


class EventType(StrEnum):
    TASK_CREATED = "task_created"
    TASK_UPDATED = "task_updated"


class TaskEvent(BaseModel):
    """The task event. Only `task_id` is acted on: the task document in Mongo is the truth."""

    model_config = ConfigDict(extra="allow")

    event_type: str
    task_id: str = Field(min_length=1, max_length=128)
    task_type: str | None = None
    world_id: str | None = None
    parameters: dict[str, Any] | None = None

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class BadMessage(Exception):
    """A message that cannot become a TaskEvent; `reason` goes into the dead-letter headers."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_task_event(raw: bytes | None) -> TaskEvent:
    """Decode and validate one message value. Raises BadMessage with a short readable reason."""
    if raw is None:
        raise BadMessage("empty message (null value)")
    if len(raw) > MAX_EVENT_BYTES:
        raise BadMessage(f"message too large ({len(raw)} bytes > {MAX_EVENT_BYTES})")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadMessage(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadMessage(f"not a JSON object (got {type(data).__name__})")
    try:
        event = TaskEvent.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "event"
        raise BadMessage(f"invalid event: {where}: {first['msg']}") from None
    try:
        uuid.UUID(event.task_id)
    except ValueError:
        raise BadMessage(f"invalid event: task_id is not a UUID ({event.task_id[:64]!r})") from None
    return event


def task_created(task_id: str, task_type: str, world_id: str) -> TaskEvent:
    return TaskEvent(event_type=EventType.TASK_CREATED, task_id=task_id, task_type=task_type, world_id=world_id)


def utcnow() -> datetime:
    return datetime.now(UTC)
