"""Budgets reserved before the call (ARCHITECTURE.md, "Bounded cost").

Before every paid provider call the caller reserves the call's estimated MAXIMUM cost (prompt tokens x
input price + max tokens x output price, or the image price) and one call against the world's call limit,
with one atomic conditional update that fails when it would pass the cap; after the call it settles the
reservation to the real cost. Several worker processes share the ledger, so concurrent reservations never
overshoot: the condition and the increment are one MongoDB operation.

Per world the ledger lives on `world_generation_status` (fields we add: `budget_usd`,
`budget_committed_usd` = reserved + spent, `api_calls_reserved_LLM`, `api_calls_reserved_images`); the
global daily cap lives in `budgets` (`_id` "daily:YYYY-MM-DD", `committed_usd`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import structlog
from pymongo.errors import DuplicateKeyError

from ai_worker.errors import BudgetExceeded
from ai_worker.mongo import Collection, Database
from ai_worker.observability.metrics import budget_refused
from ai_worker.providers.history import CallContext
from ai_worker.worlds.status import CALL_FIELDS, LIVE, CallKind, WorldStatusStore

log = structlog.get_logger(__name__)

Kind = CallKind
BUDGETS_COLLECTION = "budgets"
RAISE_HINT = ("To give worlds more: the task's budget_usd parameter (ai-worker send --budget-usd), or the worker's "
              "WORLD_BUDGET_USD (one cap for every world) or WORLD_BUDGET_FACTOR (default cap = factor x the world's "
              "predicted cost, see ai-worker cost), fixed when a world starts; a world that failed on its budget "
              "continues with ai-worker retry WORLD_ID --budget-usd X.")
_CAP_CACHE_SIZE = 4096


@dataclass
class Reservation:
    world_id: str | None
    day: str | None
    amount: float
    kind: Kind = "llm"


class CallBudget(Protocol):
    async def reserve(self, call: CallContext, kind: Kind, max_cost: float) -> Reservation: ...
    async def settle(self, reservation: Reservation, actual_cost: float, *, counted: bool = True) -> None: ...


class Unlimited:
    """No ledger (unit tests, tools): every reservation succeeds."""

    async def reserve(self, call: CallContext, kind: Kind, max_cost: float) -> Reservation:
        return Reservation(world_id=None, day=None, amount=max_cost)

    async def settle(self, reservation: Reservation, actual_cost: float, *, counted: bool = True) -> None:
        return None


class MongoBudget:
    """The per-world ledger is kept by the world's status store; the daily one is `budgets` (owned here)."""

    def __init__(self, db: Database, *, daily_cap_usd: float, worlds: WorldStatusStore | None = None) -> None:
        self._worlds = worlds or WorldStatusStore(db)
        self._budgets: Collection = db[BUDGETS_COLLECTION]
        self._daily_cap = daily_cap_usd
        self._caps: dict[str, tuple[float | None, dict[Kind, int | None]]] = {}

    async def _world_caps(self, world_id: str) -> tuple[float | None, dict[Kind, int | None]] | None:
        """(money cap, call limits) of a world; constant once the world exists, so cached."""
        if world_id in self._caps:
            return self._caps[world_id]
        doc = await self._worlds.ledger(world_id)
        if doc is None:
            return None
        cap = doc.get("budget_usd")
        limits = {kind: doc.get(fields[3]) for kind, fields in CALL_FIELDS.items()}
        entry = (float(cap) if isinstance(cap, int | float) else None,
                 {k: int(v) if isinstance(v, int) else None for k, v in limits.items()})
        if len(self._caps) >= _CAP_CACHE_SIZE:  # a long-running worker sees many worlds: keep the cache bounded
            self._caps.pop(next(iter(self._caps)))
        self._caps[world_id] = entry
        return entry

    async def reserve(self, call: CallContext, kind: Kind, max_cost: float) -> Reservation:
        amount = max(0.0, float(max_cost))
        day = await self._reserve_daily(amount) if self._daily_cap > 0 else None
        world_id = call.world_id
        try:
            if world_id is not None:
                await self._reserve_world(world_id, kind, amount)
        except BaseException:
            if day is not None:
                await self._budgets.update_one({"_id": day}, {"$inc": {"committed_usd": -amount}})
            raise
        return Reservation(world_id=world_id, day=day, amount=amount, kind=kind)

    async def _reserve_world(self, world_id: str, kind: Kind, amount: float) -> None:
        caps = await self._world_caps(world_id)
        if caps is None:  # no status document: not a world this worker started (tools, tests)
            return
        cap, limits = caps
        limit = limits.get(kind)
        if await self._worlds.reserve(world_id, kind, amount, cap, limit):
            return
        # Refused: the cap may have been raised since it was cached (an operator's retry): read it again.
        self._caps.pop(world_id, None)
        fresh = await self._world_caps(world_id)
        if fresh is not None and fresh != caps:
            cap, limits = fresh
            limit = limits.get(kind)
            if await self._worlds.reserve(world_id, kind, amount, cap, limit):
                return
        reserved_field = CALL_FIELDS[kind][2]
        doc = await self._worlds.get(world_id) or {}
        if doc.get("status") not in LIVE:
            budget_refused("world_not_live")
            raise BudgetExceeded(f"world {world_id} is {doc.get('status')}: no more paid calls")
        if limit is not None and int(doc.get(reserved_field, 0)) >= limit:
            budget_refused("world_calls")
            raise BudgetExceeded(f"world call limit reached: {limit} {kind} calls")
        budget_refused("world_money")
        raise BudgetExceeded(
            f"world budget of ${cap:.4f} would be exceeded: ${float(doc.get('budget_committed_usd', 0.0)):.4f} "
            f"committed, this call may cost up to ${amount:.4f}. {RAISE_HINT}")

    async def _reserve_daily(self, amount: float) -> str:
        day = "daily:" + datetime.now(UTC).strftime("%Y-%m-%d")
        with contextlib.suppress(DuplicateKeyError):  # two processes created it at once: it exists now
            await self._budgets.update_one({"_id": day}, {"$setOnInsert": {"committed_usd": 0.0}}, upsert=True)
        res = await self._budgets.update_one(
            {"_id": day, "committed_usd": {"$lte": self._daily_cap - amount}}, {"$inc": {"committed_usd": amount}})
        if not res.matched_count:
            budget_refused("daily")
            raise BudgetExceeded(f"daily budget of ${self._daily_cap:.2f} would be exceeded (DAILY_BUDGET_USD)")
        return day

    async def settle(self, reservation: Reservation, actual_cost: float, *, counted: bool = True) -> None:
        """Replace the reservation by the real cost (a refund when the call cost less) and, when the call
        was `counted` (it reached the provider and is in the request history), count it and its cost on
        the world's counters: one update of the world's document per call."""
        cost = max(0.0, float(actual_cost))
        delta = cost - reservation.amount
        try:
            if reservation.world_id is not None and (counted or delta != 0):
                await self._worlds.settle(reservation.world_id, reservation.kind, delta, cost, count=counted)
            if reservation.day is not None and delta != 0:
                await self._budgets.update_one({"_id": reservation.day}, {"$inc": {"committed_usd": delta}})
        except Exception as exc:  # the reservation stays (conservative): never under-counts spend
            log.warning("budget settle failed; reservation kept", error=str(exc))
