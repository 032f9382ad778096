"""Per-model statistics: the $inc document per record, merging days, percentiles."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from ai_worker.providers.stats import (
    LATENCY_BOUNDS_MS,
    STATS_COLLECTION,
    ModelStatsRow,
    ModelStatsStore,
    bucket_of,
    days_back,
    rows_from_docs,
    stats_update,
)


def record(model: str = "m/a", status: str = "ok", duration_ms: int = 120, **extra: Any) -> dict[str, Any]:
    return {"api_type": "llm", "model": model, "provider": "openrouter", "status": status,
            "duration_ms": duration_ms, "prompt_tokens": 100, "completion_tokens": 20, "cached_tokens": 5,
            "reasoning_tokens": 0, "cost": 0.001, "fallback": False,
            "created_at": datetime(2026, 11, 21, 12, tzinfo=UTC), **extra}


def apply(docs: dict[str, dict[str, Any]], rec: dict[str, Any]) -> None:
    """A tiny in-memory `update_one(..., upsert=True)` for $inc/$set/$setOnInsert with dotted paths."""
    query, update = stats_update(rec)
    doc = docs.setdefault(query["_id"], {"_id": query["_id"], **update["$setOnInsert"]})
    doc.update(update["$set"])
    for path, value in update["$inc"].items():
        target = doc
        *parents, leaf = path.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = target.get(leaf, 0) + value


def test_buckets() -> None:
    assert bucket_of(0) == 0
    assert bucket_of(50) == 0
    assert bucket_of(51) == 1
    assert bucket_of(10**9) == len(LATENCY_BOUNDS_MS)


def test_update_document_shape() -> None:
    query, update = stats_update(record(status="error", fallback=True))
    assert query == {"_id": "2026-11-21|llm|m/a"}
    assert update["$inc"]["calls"] == 1 and update["$inc"]["errors"] == 1 and update["$inc"]["ok"] == 0
    assert update["$inc"]["fallbacks"] == 1
    assert update["$inc"]["latency_hist.b02"] == 1
    assert update["$setOnInsert"] == {"day": "2026-11-21", "api_type": "llm", "model": "m/a"}


def test_rows_merge_days_and_models() -> None:
    docs: dict[str, dict[str, Any]] = {}
    for i in range(19):
        apply(docs, record(duration_ms=100 + i))
    apply(docs, record(status="error", duration_ms=5000))
    apply(docs, record(created_at=datetime(2026, 11, 20, tzinfo=UTC)))
    apply(docs, record(model="m/b", duration_ms=40))
    rows = rows_from_docs(docs.values())
    assert [(r.model, r.calls) for r in rows] == [("m/a", 21), ("m/b", 1)]
    a = rows[0]
    assert a.ok == 20 and a.errors == 1
    assert a.success_rate == pytest.approx(20 / 21)
    assert a.prompt_tokens == 2100 and a.completion_tokens == 420 and a.cached_tokens == 105
    assert a.cost == pytest.approx(0.021)
    assert 50 < a.percentile(0.5) <= 200  # all the fast ones are in the 100-200 ms bucket
    assert 3000 < a.percentile(0.99) <= 5000
    d = a.as_dict()
    assert d["calls"] == 21 and d["p50_ms"] == round(a.percentile(0.5), 1)


def test_exact_percentiles_from_history() -> None:
    row = ModelStatsRow("llm", "m")
    for ms in (10, 20, 30, 40, 1000):
        row.add_record(record(duration_ms=ms))
    assert row.percentile(0.5) == 30
    assert row.percentile(0.95) == 1000
    assert ModelStatsRow("llm", "empty").percentile(0.5) == 0.0


def test_days_back() -> None:
    now = datetime(2026, 3, 1, 5, tzinfo=UTC)
    assert days_back(2, now) == ["2026-03-01", "2026-02-28"]
    assert days_back(0, now) == ["2026-03-01"]


def test_prometheus_counts_provider_calls() -> None:
    from prometheus_client import REGISTRY

    from ai_worker.observability.metrics import observe_call
    from ai_worker.providers.history import ApiRequestRecord

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = value("ai_worker_provider_requests_total", api_type="llm", model="prom/m", status="ok", fallback="true")
    rec = ApiRequestRecord(api_type="llm", task_id=None, world_id=None, request_type="post", request_data={},
                           duration_ms=250, model="prom/m", fallback=True, prompt_tokens=10, cost=0.5)
    observe_call(rec)
    observe_call(rec.model_copy(update={"api_type": "grpc"}))  # not a provider call: ignored
    after = value("ai_worker_provider_requests_total", api_type="llm", model="prom/m", status="ok", fallback="true")
    assert after - before == 1
    assert value("ai_worker_provider_cost_usd_total", api_type="llm", model="prom/m") >= 0.5


class _StatsCol:
    def __init__(self) -> None:
        self.updates: list[tuple[dict[str, Any], dict[str, Any]]] = []

    async def update_one(self, query: dict[str, Any], update: dict[str, Any], upsert: bool = False) -> None:
        self.updates.append((query, update))


async def test_attempts_are_summed_in_the_process_and_written_once_per_model_and_day() -> None:
    col = _StatsCol()
    store = ModelStatsStore({STATS_COLLECTION: col}, flush_s=60)  # type: ignore[arg-type]
    for status in ("ok", "ok", "error"):
        await store.add(record(status=status))
    await store.add(record(model="other/model"))
    assert col.updates == []  # nothing written per call
    await store.aclose()  # a worker that stops writes what it holds
    assert len(col.updates) == 2
    by_model = {q["_id"].split("|")[-1]: u["$inc"] for q, u in col.updates}
    assert (by_model[record()["model"]]["calls"], by_model[record()["model"]]["errors"]) == (3, 1)
    assert by_model["other/model"]["calls"] == 1


async def test_without_a_flush_interval_each_attempt_is_written_at_once() -> None:
    col = _StatsCol()
    store = ModelStatsStore({STATS_COLLECTION: col})  # type: ignore[arg-type]
    await store.add(record())
    assert len(col.updates) == 1
