"""Hand-made worlds for the console tests: the documents the worker writes, inserted directly, so a page
can be checked without running a world (the browser tests run a real one too)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

STAGES = ["initializing", "world_description", "world_image", "characters", "posts", "finishing"]
MEDIA = "http://media.invalid/media"


@dataclass
class SeededWorld:
    world_id: str
    character_ids: list[str] = field(default_factory=list)
    post_task_ids: list[str] = field(default_factory=list)
    failed_task_id: str | None = None


def _task(world_id: str, type_: str, status: str, parameters: dict[str, Any], result: dict[str, Any] | None,
          when: datetime, **extra: Any) -> dict[str, Any]:
    return {"_id": str(uuid.uuid4()), "type": type_, "world_id": world_id, "status": status, "worker_id": None,
            "parameters": parameters, "result": result, "error": None, "attempt_count": 1, "created_at": when,
            "updated_at": when, **extra}


def world_docs(*, name: str = "Lanternfall", status: str = "in_progress", users: int = 3, posts: int = 6,
               made_users: int | None = None, made_posts: int | None = None, captions: dict[int, str] | None = None,
               failed_error: tuple[str, str] | None = None, media: str = MEDIA, age_s: float = 120,
               avatar_urls: dict[int, str] | None = None) -> tuple[SeededWorld, dict[str, list[dict[str, Any]]]]:
    """The documents of one world, by collection. `failed_error` = (error_type, message) adds a failed task."""
    world_id = str(uuid.uuid4())
    seeded = SeededWorld(world_id)
    made_users = users if made_users is None else made_users
    made_posts = posts if made_posts is None else made_posts
    start = datetime.now(UTC) - timedelta(seconds=age_s)
    terminal = status in ("completed", "failed")
    stage_status = "completed" if status == "completed" else "in_progress"
    status_doc = {
        "_id": world_id, "status": status, "current_stage": "posts" if not terminal else "finishing",
        "stages": [{"name": s, "status": stage_status if i >= 3 else "completed"} for i, s in enumerate(STAGES)],
        "tasks_total": 10, "tasks_completed": 7, "tasks_failed": 1 if failed_error else 0, "task_predicted": 20,
        "users_created": made_users, "posts_created": made_posts, "users_predicted": users, "posts_predicted": posts,
        "api_call_limits_LLM": 50, "api_call_limits_images": 40, "api_calls_made_LLM": 12,
        "api_calls_made_images": 9, "llm_cost_total": 0.0123, "image_cost_total": 0.351, "budget_usd": 25.0,
        "parameters": {"users_count": users, "posts_count": posts, "user_prompt": f"A prompt for {name}"},
        "created_at": start, "updated_at": start + timedelta(seconds=30),
    }
    if terminal:
        status_doc["finished_at"] = start + timedelta(seconds=60)
    params_doc = {"_id": world_id, "name": name, "language": "English", "summary": f"{name} is a test world.",
                  "setting": "Canals", "history": "Long", "society": "Guilds", "tone": "Warm",
                  "locations": [{"name": "The Quay", "description": "Where boats meet."}],
                  "themes": ["lanterns", "tides"], "header_image_prompt": "x", "icon_image_prompt": "y"}
    tasks: list[dict[str, Any]] = [
        _task(world_id, "generate_world_image", "completed", {}, {
            "header_url": f"{media}/{world_id}-header", "icon_url": f"{media}/{world_id}-icon",
            "header_media_id": "h", "icon_media_id": "i"}, start),
    ]
    for i in range(users):
        made = i < made_users
        cid = str(uuid.uuid4())
        spec = {"username": f"user_{i}", "display_name": f"Person {i}", "bio": f"Bio of person {i}.",
                "personality": "calm", "occupation": f"Job {i}", "interests": ["a", "b"], "speaking_style": "plain",
                "avatar_prompt": "portrait"}
        tasks.append(_task(world_id, "generate_character", "completed" if made else "pending",
                           {"index": i, "character": spec, "posts_count": 2},
                           {"character_id": cid, "username": f"user_{i}"} if made else None, start))
        if made:
            seeded.character_ids.append(cid)
            url = (avatar_urls or {}).get(i, f"{media}/{cid}-avatar")
            tasks.append(_task(world_id, "generate_character_avatar", "completed",
                               {"character_id": cid, "index": i, "username": f"user_{i}", "avatar_prompt": "p"},
                               {"avatar_url": url, "avatar_media_id": f"m{i}"}, start))
    for j in range(made_posts):
        cid = seeded.character_ids[j % len(seeded.character_ids)]
        caption = (captions or {}).get(j, f"Post number {j} about the canals.")
        t = _task(world_id, "generate_post_image", "completed",
                  {"character_id": cid, "post_index": j, "caption": caption, "image_prompt": "pic",
                   "tags": ["canal", f"tag{j}"]},
                  {"post_id": f"post-{j}", "media_url": f"{media}/{world_id}-post-{j}", "media_id": f"pm{j}",
                   "image_error": None}, start + timedelta(seconds=j))
        seeded.post_task_ids.append(t["_id"])
        tasks.append(t)
    if failed_error:
        error_type, message = failed_error
        t = _task(world_id, "generate_post", "failed", {"character_id": seeded.character_ids[0]}, None,
                  start + timedelta(seconds=40), error=message, error_type=error_type, attempt_count=2)
        seeded.failed_task_id = t["_id"]
        tasks.append(t)
    history = [
        {"_id": str(uuid.uuid4()), "api_type": "llm", "world_id": world_id, "task_id": None, "request_type": "post",
         "request_data": {}, "model": "google/gemini-2.5-flash", "status": "ok", "total_tokens": 1200,
         "cost": 0.0123, "duration_ms": 800, "created_at": start},
        {"_id": str(uuid.uuid4()), "api_type": "image_generation", "world_id": world_id, "task_id": None,
         "request_type": "post_image", "request_data": {}, "model": "google/gemini-2.5-flash-image",
         "status": "error", "total_tokens": 0, "cost": 0.0, "duration_ms": 300, "created_at": start},
    ]
    docs = {"world_generation_status": [status_doc], "world_parameters": [params_doc], "tasks": tasks,
            "api_requests_history": history}
    return seeded, docs


async def seed_world(db: Any, **kwargs: Any) -> SeededWorld:
    """Insert one world's documents with an async (PyMongo) database."""
    seeded, docs = world_docs(**kwargs)
    for collection, items in docs.items():
        await db[collection].insert_many(items)
    return seeded


def seed_world_sync(db: Any, **kwargs: Any) -> SeededWorld:
    """The same with a synchronous database (browser tests)."""
    seeded, docs = world_docs(**kwargs)
    for collection, items in docs.items():
        db[collection].insert_many(items)
    return seeded
