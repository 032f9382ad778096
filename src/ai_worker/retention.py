"""Retention: old tasks, request history and model statistics expire through MongoDB TTL indexes.

| collection             | date field    | setting                      | default  |
|------------------------|---------------|------------------------------|----------|
| `tasks`                | `finished_at` | `TASK_RETENTION_DAYS`        | 30 days  |
| `api_requests_history` | `created_at`  | `HISTORY_RETENTION_DAYS`     | 30 days  |
| `model_stats`          | `updated_at`  | `MODEL_STATS_RETENTION_DAYS` | 400 days |

`0` keeps a collection forever (its TTL index is dropped). The server deletes a document once its date field
is older than the retention; a document without the field is never deleted, which is why only finished
tasks expire: `finished_at` is set by the store on every terminal transition (completed, failed, cancelled)
and pending or running tasks have none. Whoever moves a task out of a terminal state (a retry) must `$unset`
its `finished_at`. The world status documents the platform reads (`world_generation_status`) and
`world_parameters` are kept.

The indexes are made idempotent at every start: created when missing, left alone when they match, changed
with `collMod` when the retention changed (dropped and re-created where `collMod` cannot do it). MongoDB's
TTL monitor, like the embedded SecantusDB's sweep, runs every 60 s, so expiry lags by up to a minute."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import structlog
from pymongo import ASCENDING
from pymongo.errors import OperationFailure

from ai_worker.mongo import Collection, Database

if TYPE_CHECKING:
    from ai_worker.config import Settings

log = structlog.get_logger(__name__)

INDEX_OPTIONS_CONFLICT: Final = (85, 86)  # IndexOptionsConflict, IndexKeySpecsConflict
DAY_S: Final = 86400


@dataclass(frozen=True)
class Retention:
    collection: str
    field: str
    days: float  # 0 = keep forever

    @property
    def seconds(self) -> int | None:
        return None if self.days <= 0 else max(1, round(self.days * DAY_S))

    @property
    def index_name(self) -> str:
        return f"ttl_{self.field}"


def policies(settings: Settings) -> list[Retention]:
    from ai_worker.providers.history import HISTORY_COLLECTION
    from ai_worker.providers.stats import STATS_COLLECTION
    from ai_worker.tasks.store import TASKS

    return [Retention(TASKS, "finished_at", settings.task_retention_days),
            Retention(HISTORY_COLLECTION, "created_at", settings.history_retention_days),
            Retention(STATS_COLLECTION, "updated_at", settings.model_stats_retention_days)]


async def apply_retention(db: Database, settings: Settings) -> dict[str, str]:
    """Make every collection's TTL index match the settings; returns collection -> what was done (`created: 30
    days`, `unchanged: kept forever`, ...)."""
    done: dict[str, str] = {}
    for policy in policies(settings):
        done[policy.collection] = await ensure_ttl(db[policy.collection], policy)
        done[policy.collection] += f": {_days(policy)}"
    log.info("retention", **done)
    return done


async def ensure_ttl(col: Collection, policy: Retention) -> str:
    """Create, keep, change or drop the TTL index of `policy`; returns `created`, `unchanged`, `changed`,
    `dropped`, `absent` (keep forever, no index) or `conflict` (another index on the same field is in the
    way: logged, nothing changed)."""
    for _ in range(3):  # another worker starting at the same moment may create it between our look and our write
        current = await _ttl_index(col, policy)
        seconds = policy.seconds
        if current is None:
            if seconds is None:
                return "absent"
            try:
                await col.create_index([(policy.field, ASCENDING)], name=policy.index_name,
                                       expireAfterSeconds=seconds)
                return "created"
            except OperationFailure as exc:
                if exc.code in INDEX_OPTIONS_CONFLICT:
                    continue
                raise
        name, expire = current
        if expire is None:  # a plain index on the field that is not ours
            log.warning("retention not applied: an index on the field exists without expiry",
                        collection=col.name, field=policy.field, index=name)
            return "conflict"
        if seconds is None:
            await col.drop_index(name)
            return "dropped"
        if expire == seconds:
            return "unchanged"
        try:
            await col.database.command({"collMod": col.name, "index": {"name": name, "expireAfterSeconds": seconds}})
        except OperationFailure:  # servers without collMod of TTL indexes: drop and create
            await col.drop_index(name)
            continue
        return "changed"
    raise RuntimeError(f"could not settle the TTL index of {col.name}.{policy.field}")


async def _ttl_index(col: Collection, policy: Retention) -> tuple[str, int | None] | None:
    """(name, expireAfterSeconds or None) of the single-field index on the policy's field, if there is one."""
    async for index in await col.list_indexes():
        key: Any = index.get("key") or {}
        if list(key.items()) == [(policy.field, 1)] or index.get("name") == policy.index_name:
            expire = index.get("expireAfterSeconds")
            return str(index["name"]), int(expire) if expire is not None else None
    return None


def _days(policy: Retention) -> str:
    return "kept forever" if policy.seconds is None else f"{policy.days:g} days"


__all__ = ["Retention", "apply_retention", "ensure_ttl", "policies"]
