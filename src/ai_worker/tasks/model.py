"""Task documents (CONTRACTS.md, `tasks`). Fields we add have safe defaults when absent, because the
platform inserts the first task of a world with only the contract's keys."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["TERMINAL", "ChildTask", "TaskDoc", "TaskStatus", "child_task_id"]

# Namespace for deterministic child ids: uuid5(namespace, f"{parent_id}/{key}").
_CHILD_NAMESPACE = uuid.UUID("6f1c2a8e-3b0d-4c55-9a3e-1d2f0b7c9e41")


class TaskStatus(StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})

def child_task_id(parent_id: str, key: str) -> str:
    return str(uuid.uuid5(_CHILD_NAMESPACE, f"{parent_id}/{key}"))


class Attempt(BaseModel):
    model_config = ConfigDict(extra="allow")

    worker_id: str
    started_at: datetime
    ended_at: datetime | None = None
    outcome: str | None = None
    error_type: str | None = None
    error: str | None = None


class TaskDoc(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    id: str = Field(alias="_id")
    type: str
    world_id: str
    status: str
    worker_id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None
    attempt_count: int = 0
    created_at: Any = None  # a BSON date from us, a string from the platform
    updated_at: Any = None
    # ours
    parent_id: str | None = None
    lease_until: datetime | None = None
    not_before: datetime | None = None
    steps: dict[str, Any] = Field(default_factory=dict)
    attempts: list[Attempt] = Field(default_factory=list)


class ChildTask(BaseModel):
    """A child declared by a job with ctx.spawn(job, key, params)."""

    type: str
    key: str
    parameters: dict[str, Any]

    def to_document(self, parent: TaskDoc, now: datetime) -> dict[str, Any]:
        return {
            "_id": child_task_id(parent.id, self.key),
            "type": self.type,
            "world_id": parent.world_id,
            "status": TaskStatus.PENDING.value,
            "worker_id": None,
            "parameters": self.parameters,
            "result": None,
            "error": None,
            "attempt_count": 0,
            "created_at": now,
            "updated_at": now,
            "parent_id": parent.id,
            "child_key": self.key,
        }
