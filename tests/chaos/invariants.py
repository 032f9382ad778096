"""Invariants every chaos scenario asserts, and the results table `pytest -m chaos` writes.

- the world is terminal (completed, or failed only where the scenario says so);
- every task of the world is terminal;
- exactly N characters and M posts in the local platform, none created twice for one request_id;
- the status counters equal the truth recomputed from the tasks collection and the history.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient

TERMINAL = {"completed", "failed", "cancelled"}
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "chaos.md"


@dataclass
class WorldReport:
    world_id: str
    status: str
    users: int
    posts: int
    duplicates: int
    lost: int
    non_terminal_tasks: int
    failed_tasks: int


async def check_world(client: AsyncMongoClient[dict[str, Any]], database: str, world_id: str, *, users: int,
                      posts: int, expect_status: str = "completed") -> WorldReport:
    db = client[database]
    plat = client["generia_platform"]
    status = await db["world_generation_status"].find_one({"_id": world_id})
    assert status is not None, f"no world_generation_status for {world_id}"
    assert status["status"] == expect_status, (status["status"], status.get("failure_reason"))

    tasks = [t async for t in db["tasks"].find({"world_id": world_id}, {"type": 1, "status": 1})]
    by = collections.Counter((t["type"], t["status"]) for t in tasks)
    non_terminal = [t for t in tasks if t["status"] not in TERMINAL]
    assert not non_terminal, f"non-terminal tasks: {non_terminal[:5]}"

    characters = [c async for c in plat["characters"].find({"world_id": world_id})]
    post_docs = [p async for p in plat["posts"].find({"world_id": world_id})]
    dup_chars = _duplicates(characters)
    dup_posts = _duplicates(post_docs)
    duplicates = dup_chars + dup_posts
    assert duplicates == 0, f"{dup_chars} duplicated characters, {dup_posts} duplicated posts"

    failed = sum(v for (_, s), v in by.items() if s in ("failed", "cancelled"))
    if expect_status == "completed":
        assert len(characters) == users, f"{len(characters)} characters, expected {users}"
        assert len(post_docs) == posts, f"{len(post_docs)} posts, expected {posts}"

    # Counters equal recomputed truth.
    assert status["tasks_total"] == len(tasks)
    assert status["tasks_completed"] == sum(v for (_, s), v in by.items() if s == "completed")
    assert status["tasks_failed"] == failed
    assert status["users_created"] == by[("generate_character", "completed")]
    assert status["posts_created"] == by[("generate_post_image", "completed")]
    llm_calls = await db["api_requests_history"].count_documents({"world_id": world_id, "api_type": "llm"})
    image_calls = await db["api_requests_history"].count_documents(
        {"world_id": world_id, "api_type": "image_generation"})
    assert status["api_calls_made_LLM"] == llm_calls
    assert status["api_calls_made_images"] == image_calls
    lost = max(0, users - len(characters)) + max(0, posts - len(post_docs))
    return WorldReport(world_id=world_id, status=status["status"], users=len(characters), posts=len(post_docs),
                       duplicates=duplicates, lost=lost, non_terminal_tasks=len(non_terminal), failed_tasks=failed)


def _duplicates(docs: list[dict[str, Any]]) -> int:
    counts = collections.Counter(d.get("request_id") for d in docs if d.get("request_id"))
    return sum(n - 1 for n in counts.values() if n > 1)


def record_result(scenario: str, world: str, kills: int, report: WorldReport, seconds: float, notes: str = "") -> None:
    """Append one row to bench/results/chaos.md (only for `pytest -m chaos` runs, or CHAOS_RESULTS=1)."""
    if os.environ.get("CHAOS_RESULTS") != "1":
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Chaos results\n\nWritten by `CHAOS_RESULTS=1 pytest -m chaos` (see bench/README.md).\n\n"
            "| when (UTC) | scenario | world (chars/posts) | kills/faults | status | duplicates | lost "
            "| failed tasks | time to complete (s) | notes |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n"
        )
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    with RESULTS.open("a") as fh:
        fh.write(f"| {when} | {scenario} | {world} | {kills} | {report.status} | {report.duplicates} | "
                 f"{report.lost} | {report.failed_tasks} | {seconds:.1f} | {notes} |\n")
