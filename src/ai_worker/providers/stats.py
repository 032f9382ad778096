"""Per-model performance summary: calls, success rate, p50/p95 latency, tokens, cost.

Every provider attempt the recorder stores also adds to one `model_stats` document per (UTC day, API
type, model) with a single `$inc` (counters, token and cost sums, and a latency histogram with fixed
buckets), so the summary costs nothing to keep and reads in one query whatever the traffic.
Percentiles from the histogram are interpolated inside their bucket; `ai-worker models stats --world`
computes them exactly from `api_requests_history` instead.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from pymongo import ASCENDING
from pymongo.errors import DuplicateKeyError

from ai_worker.mongo import Collection, Database

log = structlog.get_logger(__name__)

STATS_COLLECTION = "model_stats"

# Upper bounds (ms) of the latency buckets; the last bucket is everything slower.
LATENCY_BOUNDS_MS = (50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 7500, 10000, 15000, 20000,
                     30000, 60000, 120000)
_COUNTED = ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens")


def bucket_of(duration_ms: int) -> int:
    return bisect.bisect_left(LATENCY_BOUNDS_MS, duration_ms)


def _bucket_key(index: int) -> str:
    return f"b{index:02d}"


def stats_id(day: str, api_type: str, model: str) -> str:
    return f"{day}|{api_type}|{model}"


def stats_update(record: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(filter, update) adding one history record to its day's document (upsert)."""
    created = record.get("created_at")
    day = (created if isinstance(created, datetime) else datetime.now(UTC)).strftime("%Y-%m-%d")
    model = str(record.get("model") or "unknown")
    api_type = str(record.get("api_type") or "unknown")
    ok = record.get("status") == "ok"
    duration = int(record.get("duration_ms") or 0)
    inc: dict[str, Any] = {
        "calls": 1,
        "ok": 1 if ok else 0,
        "errors": 0 if ok else 1,
        "fallbacks": 1 if record.get("fallback") else 0,
        "cost": float(record.get("cost") or 0.0),
        "latency_ms_total": duration,
        f"latency_hist.{_bucket_key(bucket_of(duration))}": 1,
    }
    for name in _COUNTED:
        inc[name] = int(record.get(name) or 0)
    update = {
        "$inc": inc,
        "$set": {"provider": record.get("provider"), "updated_at": created},
        "$setOnInsert": {"day": day, "api_type": api_type, "model": model},
    }
    return {"_id": stats_id(day, api_type, model)}, update


@dataclass
class ModelStatsRow:
    api_type: str
    model: str
    provider: str | None = None
    calls: int = 0
    ok: int = 0
    errors: int = 0
    fallbacks: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost: float = 0.0
    latency_ms_total: int = 0
    hist: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_MS) + 1))
    latencies: list[int] | None = None  # exact latencies, when built from the history

    @property
    def success_rate(self) -> float:
        return self.ok / self.calls if self.calls else 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def percentile(self, q: float) -> float:
        """Latency (ms) below which a fraction `q` of the calls fall."""
        if self.latencies:
            ordered = sorted(self.latencies)
            return float(ordered[max(0, math.ceil(q * len(ordered)) - 1)])
        total = sum(self.hist)
        if not total:
            return 0.0
        rank = q * total
        seen = 0
        for index, count in enumerate(self.hist):
            if count and seen + count >= rank:
                low = LATENCY_BOUNDS_MS[index - 1] if index > 0 else 0
                high = LATENCY_BOUNDS_MS[index] if index < len(LATENCY_BOUNDS_MS) else low * 2
                return low + (high - low) * (rank - seen) / count
            seen += count
        return float(LATENCY_BOUNDS_MS[-1])

    def add_doc(self, doc: Mapping[str, Any]) -> None:
        """Merge one `model_stats` document (a day) into the row."""
        self.provider = doc.get("provider") or self.provider
        for name in ("calls", "ok", "errors", "fallbacks", "latency_ms_total", *_COUNTED):
            setattr(self, name, getattr(self, name) + int(doc.get(name) or 0))
        self.cost += float(doc.get("cost") or 0.0)
        hist = doc.get("latency_hist") or {}
        for index in range(len(self.hist)):
            self.hist[index] += int(hist.get(_bucket_key(index)) or 0)

    def add_record(self, record: Mapping[str, Any]) -> None:
        """Add one `api_requests_history` document (exact latencies)."""
        self.provider = record.get("provider") or self.provider
        ok = record.get("status") == "ok"
        duration = int(record.get("duration_ms") or 0)
        self.calls += 1
        self.ok += 1 if ok else 0
        self.errors += 0 if ok else 1
        self.fallbacks += 1 if record.get("fallback") else 0
        for name in _COUNTED:
            setattr(self, name, getattr(self, name) + int(record.get(name) or 0))
        self.cost += float(record.get("cost") or 0.0)
        self.latency_ms_total += duration
        self.hist[bucket_of(duration)] += 1
        if self.latencies is None:
            self.latencies = []
        self.latencies.append(duration)

    def as_dict(self) -> dict[str, Any]:
        return {
            "api_type": self.api_type, "model": self.model, "provider": self.provider, "calls": self.calls,
            "ok": self.ok, "errors": self.errors, "success_rate": round(self.success_rate, 4),
            "fallbacks": self.fallbacks, "p50_ms": round(self.percentile(0.5), 1),
            "p95_ms": round(self.percentile(0.95), 1), "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "cached_tokens": self.cached_tokens,
            "reasoning_tokens": self.reasoning_tokens, "cost": round(self.cost, 6),
        }


def rows_from_docs(docs: Iterable[Mapping[str, Any]]) -> list[ModelStatsRow]:
    rows: dict[tuple[str, str], ModelStatsRow] = {}
    for doc in docs:
        key = (str(doc.get("api_type")), str(doc.get("model")))
        rows.setdefault(key, ModelStatsRow(*key)).add_doc(doc)
    return sorted(rows.values(), key=lambda r: (r.api_type, -r.calls, r.model))


def rows_from_history(records: Iterable[Mapping[str, Any]]) -> list[ModelStatsRow]:
    rows: dict[tuple[str, str], ModelStatsRow] = {}
    for record in records:
        key = (str(record.get("api_type")), str(record.get("model") or "unknown"))
        rows.setdefault(key, ModelStatsRow(*key)).add_record(record)
    return sorted(rows.values(), key=lambda r: (r.api_type, -r.calls, r.model))


def days_back(days: int, now: datetime | None = None) -> list[str]:
    """The UTC day keys of the last `days` days, today included."""
    today = (now or datetime.now(UTC)).date()
    return [(today - timedelta(days=n)).strftime("%Y-%m-%d") for n in range(max(1, days))]


class ModelStatsStore:
    """The owner of `model_stats`: every recorded attempt adds to its day's document, and the summary of the
    last days reads them.

    Attempts are summed in the process and written every `flush_s` seconds, one `$inc` per (day, API type,
    model) that saw calls, so the summary costs no database round trip per call (`flush_s=0` writes each
    attempt at once). The cost: a worker killed -9 loses up to `flush_s` of the summary (not of the history,
    which is the ledger); a worker that stops normally writes what it holds."""

    def __init__(self, db: Database, *, flush_s: float = 0.0) -> None:
        self._col: Collection = db[STATS_COLLECTION]
        self._flush_s = flush_s
        self._pending: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        self._flusher: asyncio.Task[None] | None = None

    async def ensure_indexes(self) -> None:
        await self._col.create_index([("day", ASCENDING)])

    async def add(self, record: Mapping[str, Any]) -> None:
        """Add one history record to its day's document (created by the first record of the day)."""
        query, update = stats_update(record)
        if self._flush_s <= 0:
            await self._write(query, update)
            return
        key = str(query["_id"])
        held = self._pending.get(key)
        if held is None:
            self._pending[key] = (query, update)
        else:
            inc = held[1]["$inc"]
            for name, value in update["$inc"].items():
                inc[name] = inc.get(name, 0) + value
            held[1]["$set"] = update["$set"]
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later())

    async def _write(self, query: dict[str, Any], update: dict[str, Any]) -> None:
        try:
            await self._col.update_one(query, update, upsert=True)
        except DuplicateKeyError:  # two processes created the day's document at once: it exists now
            await self._col.update_one(query, update, upsert=True)

    async def _flush_later(self) -> None:
        await asyncio.sleep(self._flush_s)
        try:
            await self.flush()
        except Exception as exc:  # a summary: kept for the next flush
            log.warning("model_stats_flush_failed", error=str(exc), error_type=type(exc).__name__)

    async def flush(self) -> None:
        """Write what the process holds (kept for the next flush when the database refuses it)."""
        pending, self._pending = self._pending, {}
        for key, (query, update) in pending.items():
            try:
                await self._write(query, update)
            except BaseException:
                self._pending.setdefault(key, (query, update))
                raise

    async def aclose(self) -> None:
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._flusher
        if self._pending:
            await self.flush()

    async def rows(self, *, days: int = 1) -> list[ModelStatsRow]:
        """The summary of the last `days` UTC days (exact figures for one world come from the history:
        `rows_from_history`)."""
        cursor = self._col.find({"day": {"$in": days_back(days)}})
        return rows_from_docs([doc async for doc in cursor])
