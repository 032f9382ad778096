"""Every MongoDB read of the console, as small typed async functions taking the database.

They read the collections of CONTRACTS.md (`tasks`, `world_generation_status`, `world_parameters`,
`api_requests_history`) plus `model_stats` (through its owner, ModelStatsStore) and `workers` (one status
document per worker process). Kept in one module so that they can be re-pointed at the stores' owners in
one place. Values come from documents that other programs (and an LLM) wrote: every field is read
defensively and nothing here trusts a type.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from pymongo import ASCENDING, DESCENDING

from ai_worker.mongo import Database, Document
from ai_worker.observability.worker_status import WORKERS
from ai_worker.providers.stats import ModelStatsRow, ModelStatsStore

TASKS = "tasks"
WORLD_STATUS = "world_generation_status"
WORLD_PARAMETERS = "world_parameters"
HISTORY = "api_requests_history"

WORLD_STATUSES = ("pending", "in_progress", "completed", "failed")
TERMINAL_WORLD = frozenset({"completed", "failed"})
STAGES = ("initializing", "world_description", "world_image", "characters", "posts", "finishing")

T = TypeVar("T")


# --- defensive field readers -------------------------------------------------------------------------


def _str(value: Any, default: str = "") -> str:
    return value if isinstance(value, str) else default


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: Any, default: int = 0) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    return default


def _float(value: Any, default: float = 0.0) -> float:
    if isinstance(value, bool):
        return default
    if isinstance(value, int | float) and math.isfinite(float(value)):
        return float(value)
    return default


def _opt_float(value: Any) -> float | None:
    return _float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _date(value: Any) -> datetime | None:
    return value if isinstance(value, datetime) else None


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _str_list(value: Any, limit: int = 20) -> list[str]:
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, str) and v][:limit]


# --- results -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    page: int
    per_page: int
    total: int

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.per_page)) if self.per_page else 1

    @property
    def has_prev(self) -> bool:
        return self.page > 1

    @property
    def has_next(self) -> bool:
        return self.page < self.pages


@dataclass(frozen=True)
class Stage:
    name: str
    status: str


@dataclass(frozen=True)
class WorldSummary:
    """A world's `world_generation_status` document (plus its name from `world_parameters`)."""

    id: str
    name: str | None
    prompt: str
    status: str
    stage: str
    stages: list[Stage]
    users_created: int
    users_predicted: int
    posts_created: int
    posts_predicted: int
    tasks_total: int
    tasks_completed: int
    tasks_failed: int
    task_predicted: int
    llm_calls: int
    llm_call_limit: int
    image_calls: int
    image_call_limit: int
    llm_cost: float
    image_cost: float
    budget_usd: float | None
    failure_reason: str | None
    created_at: datetime | None
    updated_at: datetime | None
    finished_at: datetime | None

    @property
    def cost(self) -> float:
        return self.llm_cost + self.image_cost

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_WORLD

    @property
    def tasks_expected(self) -> int:
        return max(self.tasks_total, self.task_predicted)


def _world_summary(doc: Document, name: str | None) -> WorldSummary:
    stages = [Stage(_str(s.get("name"), "?"), _str(s.get("status"), "pending"))
              for s in doc.get("stages") or [] if isinstance(s, dict)]
    params = _dict(doc.get("parameters"))
    return WorldSummary(
        id=str(doc.get("_id")), name=name, prompt=_str(params.get("user_prompt")),
        status=_str(doc.get("status"), "pending"), stage=_str(doc.get("current_stage"), "initializing"),
        stages=stages,
        users_created=_int(doc.get("users_created")), users_predicted=_int(doc.get("users_predicted")),
        posts_created=_int(doc.get("posts_created")), posts_predicted=_int(doc.get("posts_predicted")),
        tasks_total=_int(doc.get("tasks_total")), tasks_completed=_int(doc.get("tasks_completed")),
        tasks_failed=_int(doc.get("tasks_failed")), task_predicted=_int(doc.get("task_predicted")),
        llm_calls=_int(doc.get("api_calls_made_LLM")), llm_call_limit=_int(doc.get("api_call_limits_LLM")),
        image_calls=_int(doc.get("api_calls_made_images")),
        image_call_limit=_int(doc.get("api_call_limits_images")),
        llm_cost=_float(doc.get("llm_cost_total")), image_cost=_float(doc.get("image_cost_total")),
        budget_usd=_opt_float(doc.get("budget_usd")), failure_reason=_opt_str(doc.get("failure_reason")),
        created_at=_date(doc.get("created_at")), updated_at=_date(doc.get("updated_at")),
        finished_at=_date(doc.get("finished_at")),
    )


@dataclass(frozen=True)
class Location:
    name: str
    description: str


@dataclass(frozen=True)
class WorldText:
    """The generated description (`world_parameters`)."""

    name: str
    language: str
    summary: str
    setting: str
    history: str
    society: str
    tone: str
    locations: list[Location]
    themes: list[str]


@dataclass(frozen=True)
class WorldImages:
    """The world's header and icon: the result of its `generate_world_image` task."""

    status: str | None  # the task's status; None when the task does not exist yet
    header_url: str | None = None
    icon_url: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Character:
    """A `generate_character` task (the spec is in its parameters) joined with its avatar task."""

    task_id: str
    index: int
    status: str
    character_id: str | None
    username: str
    display_name: str
    bio: str
    occupation: str
    interests: list[str]
    avatar_status: str | None  # the avatar task's status; None when it does not exist yet
    avatar_url: str | None
    error: str | None


@dataclass(frozen=True)
class Post:
    """A `generate_post_image` task: caption and tags in its parameters, post id and picture in its result."""

    task_id: str
    status: str
    post_index: int
    character_id: str | None
    caption: str
    tags: list[str]
    post_id: str | None
    media_url: str | None
    image_error: str | None
    error: str | None
    updated_at: datetime | None
    author: Character | None = None


@dataclass(frozen=True)
class FailedTask:
    id: str
    type: str
    error_type: str | None
    error: str | None
    attempt_count: int
    updated_at: datetime | None


@dataclass(frozen=True)
class ModelCost:
    api_type: str
    model: str
    calls: int
    errors: int
    tokens: int
    cost: float
    duration_ms: int


@dataclass(frozen=True)
class WorkerStatus:
    """One worker process's self-reported status (`workers`, _id = worker id)."""

    id: str
    updated_at: datetime | None
    in_flight: int
    processed: int
    breakers: list[tuple[str, str]] = field(default_factory=list)


# --- indexes -----------------------------------------------------------------------------------------


async def ensure_indexes(db: Database) -> None:
    """The indexes the console's queries need beyond the worker's own (tasks has (world_id, status, created_at);
    api_requests_history has (world_id, api_type))."""
    # A world's posts, newest first: the sort (updated_at, then _id for ties) is the index's order.
    await db[TASKS].create_index([("world_id", ASCENDING), ("type", ASCENDING), ("updated_at", DESCENDING),
                                  ("_id", ASCENDING)])
    await db[WORLD_STATUS].create_index([("created_at", DESCENDING)])
    await db[WORLD_STATUS].create_index([("status", ASCENDING), ("created_at", DESCENDING)])


# --- worlds ------------------------------------------------------------------------------------------


async def _names(db: Database, world_ids: Iterable[str]) -> dict[str, str]:
    ids = list(world_ids)
    if not ids:
        return {}
    cursor = db[WORLD_PARAMETERS].find({"_id": {"$in": ids}}, {"name": 1})
    return {str(d["_id"]): d["name"] async for d in cursor if isinstance(d.get("name"), str) and d["name"]}


async def list_worlds(db: Database, *, status: str | None = None, page: int = 1,
                      per_page: int = 50) -> Page[WorldSummary]:
    """Worlds newest first, optionally of one status."""
    query: dict[str, Any] = {"status": status} if status else {}
    total = await db[WORLD_STATUS].count_documents(query)
    cursor = (db[WORLD_STATUS].find(query).sort([("created_at", DESCENDING), ("_id", ASCENDING)])
              .skip((page - 1) * per_page).limit(per_page))
    docs = [d async for d in cursor]
    names = await _names(db, (str(d["_id"]) for d in docs))
    return Page([_world_summary(d, names.get(str(d["_id"]))) for d in docs], page, per_page, total)


async def count_worlds(db: Database) -> dict[str, int]:
    """How many worlds have each status (and `all`)."""
    out = {s: await db[WORLD_STATUS].count_documents({"status": s}) for s in WORLD_STATUSES}
    out["all"] = await db[WORLD_STATUS].count_documents({})
    return out


async def get_world(db: Database, world_id: str) -> WorldSummary | None:
    doc = await db[WORLD_STATUS].find_one({"_id": world_id})
    if doc is None:
        return None
    names = await _names(db, [world_id])
    return _world_summary(doc, names.get(world_id))


async def world_has_tasks(db: Database, world_id: str) -> bool:
    """A world whose first task exists but whose status document does not yet (not picked up so far)."""
    return await db[TASKS].find_one({"world_id": world_id}, {"_id": 1}) is not None


async def world_text(db: Database, world_id: str) -> WorldText | None:
    doc = await db[WORLD_PARAMETERS].find_one({"_id": world_id})
    if doc is None:
        return None
    locations = [Location(_str(loc.get("name")), _str(loc.get("description")))
                 for loc in doc.get("locations") or [] if isinstance(loc, dict)][:12]
    return WorldText(
        name=_str(doc.get("name")), language=_str(doc.get("language")), summary=_str(doc.get("summary")),
        setting=_str(doc.get("setting")), history=_str(doc.get("history")), society=_str(doc.get("society")),
        tone=_str(doc.get("tone")), locations=locations, themes=_str_list(doc.get("themes")),
    )


async def world_images(db: Database, world_id: str) -> WorldImages:
    doc = await db[TASKS].find_one({"world_id": world_id, "type": "generate_world_image"},
                                   {"status": 1, "result": 1, "error": 1})
    if doc is None:
        return WorldImages(status=None)
    result = _dict(doc.get("result"))
    return WorldImages(status=_str(doc.get("status"), "pending"), header_url=_opt_str(result.get("header_url")),
                       icon_url=_opt_str(result.get("icon_url")), error=_opt_str(doc.get("error")))


# --- characters and posts ----------------------------------------------------------------------------

_CHARACTER_FIELDS = {"status": 1, "parameters.index": 1, "parameters.character": 1, "result": 1, "error": 1}


async def _avatars(db: Database, world_id: str, character_ids: list[str]) -> dict[str, tuple[str, str | None]]:
    """character id -> (avatar task status, avatar URL). A world has at most a few hundred avatar tasks:
    they are read by the (world_id, type) index prefix and picked here, which every database does fast
    (a `$in` on a field outside the index is slow on the embedded one)."""
    wanted = set(character_ids)
    if not wanted:
        return {}
    cursor = db[TASKS].find({"world_id": world_id, "type": "generate_character_avatar"},
                            {"status": 1, "parameters.character_id": 1, "result.avatar_url": 1})
    out: dict[str, tuple[str, str | None]] = {}
    async for doc in cursor:
        cid = _str(_dict(doc.get("parameters")).get("character_id"))
        if cid in wanted:
            out[cid] = (_str(doc.get("status"), "pending"), _opt_str(_dict(doc.get("result")).get("avatar_url")))
    return out


def _character(doc: Document, avatars: Mapping[str, tuple[str, str | None]]) -> Character:
    params = _dict(doc.get("parameters"))
    spec = _dict(params.get("character"))
    result = _dict(doc.get("result"))
    character_id = _opt_str(result.get("character_id"))
    avatar_status, avatar_url = avatars.get(character_id or "", (None, None))
    return Character(
        task_id=str(doc.get("_id")), index=_int(params.get("index")), status=_str(doc.get("status"), "pending"),
        character_id=character_id, username=_str(result.get("username")) or _str(spec.get("username")),
        display_name=_str(spec.get("display_name")), bio=_str(spec.get("bio")),
        occupation=_str(spec.get("occupation")), interests=_str_list(spec.get("interests"), 5),
        avatar_status=avatar_status, avatar_url=avatar_url, error=_opt_str(doc.get("error")),
    )


async def characters(db: Database, world_id: str, *, page: int = 1, per_page: int = 60) -> Page[Character]:
    """The world's characters in their planned order, each with its avatar."""
    query = {"world_id": world_id, "type": "generate_character"}
    total = await db[TASKS].count_documents(query)
    cursor = (db[TASKS].find(query, _CHARACTER_FIELDS).sort([("parameters.index", ASCENDING), ("_id", ASCENDING)])
              .skip((page - 1) * per_page).limit(per_page))
    docs = [d async for d in cursor]
    ids = [cid for d in docs if (cid := _opt_str(_dict(d.get("result")).get("character_id")))]
    avatars = await _avatars(db, world_id, ids)
    return Page([_character(d, avatars) for d in docs], page, per_page, total)


async def characters_by_id(db: Database, world_id: str, character_ids: Iterable[str]) -> dict[str, Character]:
    """The given characters of a world (picked from its at most few hundred character tasks, see _avatars)."""
    ids = sorted(set(character_ids))
    if not ids:
        return {}
    wanted = set(ids)
    cursor = db[TASKS].find({"world_id": world_id, "type": "generate_character"}, _CHARACTER_FIELDS)
    docs = [d async for d in cursor if _dict(d.get("result")).get("character_id") in wanted]
    avatars = await _avatars(db, world_id, ids)
    out: dict[str, Character] = {}
    for doc in docs:
        character = _character(doc, avatars)
        if character.character_id:
            out[character.character_id] = character
    return out


async def posts(db: Database, world_id: str, *, page: int = 1, per_page: int = 24) -> Page[Post]:
    """The world's posts, most recently changed first, each with its author."""
    query = {"world_id": world_id, "type": "generate_post_image"}
    total = await db[TASKS].count_documents(query)
    cursor = (db[TASKS].find(query, {"status": 1, "parameters.caption": 1, "parameters.tags": 1,
                                     "parameters.character_id": 1, "parameters.post_index": 1, "result": 1,
                                     "error": 1, "updated_at": 1})
              .sort([("updated_at", DESCENDING), ("_id", ASCENDING)]).skip((page - 1) * per_page).limit(per_page))
    docs = [d async for d in cursor]
    authors = await characters_by_id(
        db, world_id, (cid for d in docs if (cid := _opt_str(_dict(d.get("parameters")).get("character_id")))))
    items = []
    for doc in docs:
        params = _dict(doc.get("parameters"))
        result = _dict(doc.get("result"))
        character_id = _opt_str(params.get("character_id"))
        items.append(Post(
            task_id=str(doc.get("_id")), status=_str(doc.get("status"), "pending"),
            post_index=_int(params.get("post_index")), character_id=character_id,
            caption=_str(params.get("caption")), tags=_str_list(params.get("tags"), 10),
            post_id=_opt_str(result.get("post_id")), media_url=_opt_str(result.get("media_url")),
            image_error=_opt_str(result.get("image_error")), error=_opt_str(doc.get("error")),
            updated_at=_date(doc.get("updated_at")), author=authors.get(character_id or ""),
        ))
    return Page(items, page, per_page, total)


# --- failures, tasks, calls --------------------------------------------------------------------------


async def failed_tasks(db: Database, world_id: str, *, limit: int = 50) -> tuple[list[FailedTask], int]:
    """The world's failed tasks (most recent first, at most `limit`) and how many there are in all."""
    query = {"world_id": world_id, "status": "failed"}
    total = await db[TASKS].count_documents(query)
    cursor = (db[TASKS].find(query, {"type": 1, "error_type": 1, "error": 1, "attempt_count": 1, "updated_at": 1})
              .sort([("updated_at", DESCENDING)]).limit(limit))
    items = [FailedTask(id=str(d.get("_id")), type=_str(d.get("type"), "?"), error_type=_opt_str(d.get("error_type")),
                        error=_opt_str(d.get("error")), attempt_count=_int(d.get("attempt_count")),
                        updated_at=_date(d.get("updated_at"))) async for d in cursor]
    return items, total


async def task_counts(db: Database, world_id: str) -> dict[str, dict[str, int]]:
    """task type -> status -> count."""
    cursor = await db[TASKS].aggregate([
        {"$match": {"world_id": world_id}},
        {"$group": {"_id": {"type": "$type", "status": "$status"}, "n": {"$sum": 1}}},
    ])
    out: dict[str, dict[str, int]] = {}
    async for row in cursor:
        key = _dict(row.get("_id"))
        out.setdefault(_str(key.get("type"), "?"), {})[_str(key.get("status"), "?")] = _int(row.get("n"))
    return out


async def cost_by_model(db: Database, world_id: str) -> list[ModelCost]:
    """The world's external calls (`api_requests_history`) grouped by API type and model."""
    cursor = await db[HISTORY].aggregate([
        {"$match": {"world_id": world_id}},
        {"$group": {
            "_id": {"api_type": "$api_type", "model": "$model"},
            "calls": {"$sum": 1},
            "errors": {"$sum": {"$cond": [{"$eq": ["$status", "error"]}, 1, 0]}},
            "tokens": {"$sum": "$total_tokens"},
            "cost": {"$sum": "$cost"},
            "ms": {"$sum": "$duration_ms"},
        }},
    ])
    rows: list[ModelCost] = []
    async for row in cursor:
        key = _dict(row.get("_id"))
        rows.append(ModelCost(api_type=_str(key.get("api_type"), "?"), model=_str(key.get("model"), "-"),
                              calls=_int(row.get("calls")), errors=_int(row.get("errors")),
                              tokens=_int(row.get("tokens")), cost=_float(row.get("cost")),
                              duration_ms=_int(row.get("ms"))))
    return sorted(rows, key=lambda r: (r.api_type, -r.cost, -r.calls, r.model))


# --- models and workers ------------------------------------------------------------------------------


async def model_stats(db: Database, *, days: int = 1) -> list[ModelStatsRow]:
    """Per-model statistics of the last `days` UTC days (what `ai-worker models stats` prints)."""
    return await ModelStatsStore(db).rows(days=days)


async def workers(db: Database, *, limit: int = 200) -> list[WorkerStatus]:
    """Worker processes' self-reported status documents, most recently updated first."""
    cursor = db[WORKERS].find({}).sort([("updated_at", DESCENDING)]).limit(limit)
    out = []
    async for doc in cursor:
        breakers = sorted((str(k), _str(v, "?")) for k, v in _dict(doc.get("breakers")).items())
        out.append(WorkerStatus(id=str(doc.get("_id")), updated_at=_date(doc.get("updated_at")),
                                in_flight=_int(doc.get("in_flight")), processed=_int(doc.get("processed")),
                                breakers=breakers))
    return out
