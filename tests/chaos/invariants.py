"""Invariants every chaos scenario asserts, and the results table `pytest -m chaos` writes.

- the world is terminal (completed, or failed only where the scenario says so);
- every task of the world is terminal;
- every planned character and post exists on the platform (nothing lost);
- create calls per planned item: the local platform stores our `request_id` on every character and post (in
  both modes) and counts the calls that carried it (`create_calls`), and every presigned upload URL is one
  `media` document named after the planned image (file names are deterministic per world / character /
  index). So per planned character, post and image we know how many create calls reached the platform, and
  hence the duplicates the real platform (which ignores `request_id`) would hold: calls - 1 per character
  or post, and confirmed uploads - 1 per image (an upload never confirmed stores nothing). In real-platform
  mode (the chaos default) they are actual documents. Characters must never be duplicated (a retried
  attempt looks up what an earlier one made); posts and media may be, only in scenarios that interrupt
  calls in flight (`may_duplicate`: kill -9, database outage, cancelled drains), and are reported;
- accounting: the provider simulator's billed calls (answered 200, whether or not the reply was usable) vs
  the billed attempts in `api_requests_history` (status ok, or an error on an HTTP 200 reply) vs the world's
  counters (`api_calls_made_*` count every attempt, failed ones included, so they are compared with all the
  history's attempts, and the cost totals with the history's costs). Where no process dies mid-call the
  simulator and the history must agree (`billed_exact`); under kill -9 a call in flight is billed and never
  recorded, and that difference is reported as its own column;
- the status counters equal the truth recomputed from the tasks collection.

Scenarios call `check_world` (directly, or through `harness.Chaos.check`) and then `record_result`.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient

from ai_worker.devstack.simulator import ProviderSimulator

TERMINAL = {"completed", "failed", "cancelled"}
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "chaos.md"
ROWS_END = "<!-- new rows go above this line -->"
CHARACTER_FOUND = "character made by an earlier attempt found; not creating it again"  # jobs/character.py
PAID_KINDS = ("llm", "image_generation")


@dataclass
class Creates:
    """Create calls that reached the platform per planned item of one kind."""

    items: int = 0  # planned items that reached the platform (distinct request ids / file names)
    calls: int = 0
    max_per_item: int = 0
    documents: int = 0  # what the platform holds
    stored_extra: int = 0  # media only: confirmed uploads beyond one per planned image (orphan stored files)

    @property
    def extra(self) -> int:
        """Calls beyond one per item: the duplicates a platform that ignores request_id would hold."""
        return self.calls - self.items

    def cell(self) -> str:
        return f"{self.max_per_item} / {self.extra}" if self.items else "-"


@dataclass
class Accounting:
    sim_billed: int | None  # accepted (HTTP 200) by the provider simulator: what the provider bills
    history_billed: int  # history attempts of this world that got an HTTP 200 reply
    history_attempts: int
    counters_attempts: int  # api_calls_made_LLM + api_calls_made_images

    @property
    def unrecorded(self) -> int | None:
        return None if self.sim_billed is None else self.sim_billed - self.history_billed


@dataclass
class WorldReport:
    world_id: str
    status: str
    users: int
    posts: int
    duplicates: int  # characters + posts + confirmed media a real platform would hold twice
    lost: int
    non_terminal_tasks: int
    failed_tasks: int
    platform_mode: str = "local"
    characters: Creates = field(default_factory=Creates)
    post_creates: Creates = field(default_factory=Creates)
    media: Creates = field(default_factory=Creates)
    accounting: Accounting | None = None

    @property
    def create_calls(self) -> int:
        return self.characters.calls + self.post_creates.calls + self.media.calls

    @property
    def duplicates_per_1000(self) -> float:
        return 1000.0 * self.duplicates / self.create_calls if self.create_calls else 0.0


async def check_world(client: AsyncMongoClient[dict[str, Any]], database: str, world_id: str, *, users: int,
                      posts: int, expect_status: str = "completed", simulator: ProviderSimulator | None = None,
                      platform_mode: str = "local", may_duplicate: bool = False,
                      billed_exact: bool = True) -> WorldReport:
    """Assert the invariants (module docstring) and return the figures. `simulator`: compare its billed calls
    with the history (the stack must have served this world only). `may_duplicate`: the scenario interrupts
    calls in flight, so posts and media may be created twice (reported, not asserted). `billed_exact`: no
    process dies mid-call, so every billed call is in the history."""
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
    media_docs = [m async for m in plat["media"].find({"world_id": world_id}, {"filename": 1, "status": 1})]
    chars = creates_by_request_id(characters)
    post_creates = creates_by_request_id(post_docs)
    media = creates_by_filename(media_docs)
    assert chars.extra == 0, f"characters created more than once per planned character: {chars}"
    if not may_duplicate:
        assert post_creates.extra == 0, f"posts created more than once per planned post: {post_creates}"
        assert media.extra == 0, f"media uploaded more than once per planned image: {media}"
    duplicates = chars.extra + post_creates.extra + media.stored_extra
    # In real-platform mode every call is a document; in local mode repeats returned the first one.
    if platform_mode == "real":
        assert chars.documents == chars.calls and post_creates.documents == post_creates.calls
    else:
        assert chars.documents == chars.items and post_creates.documents == post_creates.items

    failed = sum(v for (_, s), v in by.items() if s in ("failed", "cancelled"))
    if expect_status == "completed":
        assert chars.items == users, f"{chars.items} characters made, expected {users}"
        assert post_creates.items == posts, f"{post_creates.items} posts made, expected {posts}"

    # Counters equal recomputed truth.
    assert status["tasks_total"] == len(tasks)
    assert status["tasks_completed"] == sum(v for (_, s), v in by.items() if s == "completed")
    assert status["tasks_failed"] == failed
    assert status["users_created"] == by[("generate_character", "completed")]
    assert status["posts_created"] == by[("generate_post_image", "completed")]
    accounting = await check_accounting(client, database, world_id, status, simulator, billed_exact=billed_exact)
    lost = max(0, users - chars.items) + max(0, posts - post_creates.items)
    return WorldReport(world_id=world_id, status=status["status"], users=chars.items, posts=post_creates.items,
                       duplicates=duplicates, lost=lost, non_terminal_tasks=len(non_terminal), failed_tasks=failed,
                       platform_mode=platform_mode, characters=chars, post_creates=post_creates, media=media,
                       accounting=accounting)


async def check_accounting(client: AsyncMongoClient[dict[str, Any]], database: str, world_id: str,
                           status: dict[str, Any], simulator: ProviderSimulator | None, *,
                           billed_exact: bool) -> Accounting:
    history = [h async for h in client[database]["api_requests_history"].find(
        {"world_id": world_id, "api_type": {"$in": list(PAID_KINDS)}},
        {"api_type": 1, "status": 1, "status_code": 1, "cost": 1})]
    by_kind = collections.Counter(h["api_type"] for h in history)
    # The world's counters count attempts, failed ones included: compare them with all the history's attempts.
    assert status["api_calls_made_LLM"] == by_kind["llm"], (status["api_calls_made_LLM"], by_kind)
    assert status["api_calls_made_images"] == by_kind["image_generation"], (status["api_calls_made_images"], by_kind)
    for kind, total in (("llm", "llm_cost_total"), ("image_generation", "image_cost_total")):
        spent = sum(float(h.get("cost") or 0.0) for h in history if h["api_type"] == kind)
        assert abs(float(status[total]) - spent) < 1e-6, (total, status[total], spent)
    billed = sum(1 for h in history if h["status"] == "ok" or h.get("status_code") == 200)
    sim_billed: int | None = None
    if simulator is not None:
        sim_billed = sum(int(s.get("ok", 0)) for s in simulator.model_stats().values())
        assert billed <= sim_billed, f"history holds {billed} billed calls, the provider billed only {sim_billed}"
        if billed_exact:
            assert billed == sim_billed, (
                f"the provider billed {sim_billed} calls, the history recorded {billed}: "
                f"{sim_billed - billed} paid calls missing from api_requests_history")
    return Accounting(sim_billed=sim_billed, history_billed=billed, history_attempts=len(history),
                      counters_attempts=int(status["api_calls_made_LLM"]) + int(status["api_calls_made_images"]))


def creates_by_request_id(docs: list[dict[str, Any]]) -> Creates:
    """Characters or posts: one planned item per request_id (the worker's key is stable per task)."""
    calls: collections.Counter[str] = collections.Counter()
    for doc in docs:
        request_id = doc.get("request_id")
        assert request_id, f"a platform object without the worker's request_id: {doc.get('_id')}"
        calls[str(request_id)] += int(doc.get("create_calls", 1))
    return Creates(items=len(calls), calls=sum(calls.values()), max_per_item=max(calls.values(), default=0),
                   documents=len(docs))


def creates_by_filename(docs: list[dict[str, Any]]) -> Creates:
    """Media: one planned image per file name; every presigned URL handed out is one document (an upload
    attempt); an attempt that was never confirmed stores nothing, a second confirmed one is an orphan file."""
    calls = collections.Counter(str(d["filename"]) for d in docs)
    confirmed = collections.Counter(str(d["filename"]) for d in docs if d.get("status") == "confirmed")
    return Creates(items=len(calls), calls=sum(calls.values()), max_per_item=max(calls.values(), default=0),
                   documents=len(docs), stored_extra=sum(n - 1 for n in confirmed.values()))


HEADER = (
    "| when (UTC) | scenario | platform | world (chars/posts) | kills/faults | status | lost | failed tasks "
    "| creates per character: max / extra | creates per post: max / extra | uploads per image: max / extra "
    "| real-platform duplicates (chars+posts+stored media) | per 1000 creates | provider billed: simulator / history "
    "| billed, not recorded | attempts: history / counters | time to complete (s) | notes |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def result_row(scenario: str, world: str, kills: int, report: WorldReport, seconds: float, notes: str = "") -> str:
    acc = report.accounting
    billed = "-" if acc is None or acc.sim_billed is None else f"{acc.sim_billed} / {acc.history_billed}"
    unrecorded = "-" if acc is None or acc.unrecorded is None else str(acc.unrecorded)
    attempts = "-" if acc is None else f"{acc.history_attempts} / {acc.counters_attempts}"
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    dups = f"{report.duplicates} ({report.characters.extra}+{report.post_creates.extra}+{report.media.stored_extra})"
    return (f"| {when} | {scenario} | {report.platform_mode} | {world} | {kills} | {report.status} | {report.lost} | "
            f"{report.failed_tasks} | {report.characters.cell()} | {report.post_creates.cell()} | "
            f"{report.media.cell()} | {dups} | {report.duplicates_per_1000:.1f} | {billed} | {unrecorded} | "
            f"{attempts} | {seconds:.1f} | {notes} |\n")


def record_result(scenario: str, world: str, kills: int, report: WorldReport, seconds: float, notes: str = "") -> None:
    """Add one row to the current table of bench/results/chaos.md (only with CHAOS_RESULTS=1)."""
    row = result_row(scenario, world, kills, report, seconds, notes)
    print(row, end="")
    if os.environ.get("CHAOS_RESULTS") != "1":
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    text = RESULTS.read_text() if RESULTS.exists() else ""
    if ROWS_END not in text:
        text = ("# Chaos results\n\nWritten by `CHAOS_RESULTS=1 pytest -m chaos` (see bench/README.md).\n\n"
                + HEADER + ROWS_END + "\n" + text)
    RESULTS.write_text(text.replace(ROWS_END, row + ROWS_END, 1))
