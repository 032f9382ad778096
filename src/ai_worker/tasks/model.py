"""Task documents (CONTRACTS.md, `tasks`). Fields we add have safe defaults when absent, because the
platform inserts the first task of a world with only the contract's keys."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ai_worker.errors import PermanentError

__all__ = ["TERMINAL", "ChildTask", "InvalidTaskDocument", "TaskDoc", "TaskStatus", "child_task_id", "parse_task"]

# Namespace for deterministic child ids: uuid5(namespace, f"{parent_id}/{key}").
_CHILD_NAMESPACE = uuid.UUID("6f1c2a8e-3b0d-4c55-9a3e-1d2f0b7c9e41")


class TaskStatus(StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})
TERMINAL_VALUES = frozenset(s.value for s in TERMINAL)
StatusValue = Literal["pending", "in_progress", "completed", "failed", "cancelled"]


def child_task_id(parent_id: str, key: str) -> str:
    return str(uuid.uuid5(_CHILD_NAMESPACE, f"{parent_id}/{key}"))


class Attempt(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    worker_id: str
    started_at: datetime
    ended_at: datetime | None = None
    outcome: str | None = None
    error_type: str | None = None
    error: str | None = None


class TaskDoc(BaseModel):
    """A task document as the worker reads it. Strict: a value of the wrong type (a null `parameters`, a
    string `attempt_count`, a string `lease_until`) is a malformed document, not something to coerce;
    only `created_at` / `updated_at` may be strings (the platform writes them so)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, strict=True)

    id: str = Field(alias="_id")
    type: str
    world_id: str
    status: StatusValue
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
    free_retries: int = 0  # retries that did not spend an attempt (infrastructure errors, provider waits)


class InvalidTaskDocument(PermanentError):
    """A task document that does not have the contract's shape; it is quarantined (failed), never run."""

    error_type = "invalid_task_document"


def parse_task(raw: Mapping[str, Any]) -> TaskDoc:
    """Validate one raw task document; raises InvalidTaskDocument with a readable reason."""
    try:
        return TaskDoc.model_validate(raw)
    except ValidationError as exc:
        parts = []
        for err in exc.errors()[:4]:
            where = ".".join(str(p) for p in err["loc"]) or "document"
            parts.append(f"{where}: {err['msg']}")
        raise InvalidTaskDocument("invalid task document: " + "; ".join(parts)) from None


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
