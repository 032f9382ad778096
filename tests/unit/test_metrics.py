"""The worker's Prometheus families (observability/metrics.py) without servers: dead-letter reasons become a
small fixed set of categories, budget refusals are counted by kind where they are raised, a task attempt is
counted once with its outcome (abandoned when it ends without one), gRPC codes, the consumer lag gauge, and
the worker status document."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import pytest
from aiokafka import TopicPartition
from fakedb import FakeDatabase
from prometheus_client import REGISTRY

from ai_worker.errors import BudgetExceeded
from ai_worker.messaging.events import BadMessage, parse_task_event
from ai_worker.observability import metrics
from ai_worker.observability.attempts import attempt_outcome, task_attempt
from ai_worker.observability.worker_status import WORKERS, WorkerStatusReporter, WorkerStatusStore, ttl_s
from ai_worker.providers.budget import MongoBudget
from ai_worker.providers.history import CallContext


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def reason_of(raw: bytes | None) -> str:
    with pytest.raises(BadMessage) as info:
        parse_task_event(raw)
    return info.value.reason


# --- dead letters ----------------------------------------------------------------------------------------
def test_every_dead_letter_reason_falls_into_its_category() -> None:
    """The reasons the worker writes (parse_task_event, the engine, the consumer) map to fixed categories."""
    task_id = str(uuid.uuid4())
    cases = {
        reason_of(b"this is not json {"): "not_json",
        reason_of(None): "not_json",
        reason_of(b"[1, 2]"): "invalid_event",
        reason_of(b'{"event_type": "task_created"}'): "invalid_event",
        reason_of(b'{"event_type": "task_created", "task_id": "not-a-uuid"}'): "invalid_event",
        reason_of(b" " * (64 * 1024 + 1)): "invalid_event",
        "not a task event": "invalid_event",
        "unknown event_type 'task_exploded'": "unknown_event_type",
        f"unknown task id {task_id}: no such task document": "unknown_task",
        "unknown task type 'generate_poem'": "unknown_task_type",
        "invalid_task_document: parameters: not an object": "invalid_task_document",
        "the consumer said something new": "other",
    }
    for reason, category in cases.items():
        assert metrics.dead_letter_category(reason) == category, reason
    assert set(cases.values()) == set(metrics.DEAD_LETTER_REASONS)


def test_dead_letters_are_counted_by_category_never_by_text() -> None:
    before = value("ai_worker_dead_letters_total", reason="unknown_task")
    metrics.dead_lettered(f"unknown task id {uuid.uuid4()}: no such task document")
    metrics.dead_lettered(f"unknown task id {uuid.uuid4()}: no such task document")
    assert value("ai_worker_dead_letters_total", reason="unknown_task") == before + 2
    text = metrics_text()
    assert "no such task document" not in text
    for category in metrics.DEAD_LETTER_REASONS:  # every category is exported from the start
        assert f'ai_worker_dead_letters_total{{reason="{category}"}}' in text


def metrics_text() -> str:
    from prometheus_client import generate_latest

    return generate_latest().decode()


# --- budget refusals -----------------------------------------------------------------------------------------
WORLD = "world-refusals"
CALL = CallContext(task_id="t1", world_id=WORLD, request_type="post")


def world_db(**fields: Any) -> FakeDatabase:
    db = FakeDatabase()
    db["world_generation_status"].docs[WORLD] = {
        "_id": WORLD, "status": "in_progress", "budget_usd": 1.0, "budget_committed_usd": 0.0,
        "api_call_limits_LLM": 10, "api_call_limits_images": 10, "api_calls_reserved_LLM": 0,
        "api_calls_reserved_images": 0, **fields}
    return db


@pytest.mark.parametrize(("kind", "fields", "daily_cap", "cost"), [
    ("world_money", {}, 0.0, 5.0),
    ("world_calls", {"api_call_limits_LLM": 1, "api_calls_reserved_LLM": 1}, 0.0, 0.01),
    ("world_not_live", {"status": "failed"}, 0.0, 0.01),
    ("daily", {}, 0.5, 1.0),
])
async def test_budget_refusals_are_counted_by_kind(kind: str, fields: dict[str, Any], daily_cap: float,
                                                   cost: float) -> None:
    before = {k: value("ai_worker_budget_refusals_total", kind=k) for k in metrics.REFUSAL_KINDS}
    budget = MongoBudget(world_db(**fields), daily_cap_usd=daily_cap)
    with pytest.raises(BudgetExceeded):
        await budget.reserve(CALL, "llm", cost)
    after = {k: value("ai_worker_budget_refusals_total", kind=k) for k in metrics.REFUSAL_KINDS}
    assert {k: after[k] - before[k] for k in after} == {k: float(k == kind) for k in after}


async def test_a_granted_reservation_counts_no_refusal() -> None:
    before = sum(value("ai_worker_budget_refusals_total", kind=k) for k in metrics.REFUSAL_KINDS)
    await MongoBudget(world_db(), daily_cap_usd=0).reserve(CALL, "llm", 0.1)
    assert sum(value("ai_worker_budget_refusals_total", kind=k) for k in metrics.REFUSAL_KINDS) == before


# --- task attempts -------------------------------------------------------------------------------------------
def attempt_counts(task_type: str, outcome: str) -> tuple[float, float, float]:
    return (value("ai_worker_tasks_started_total", type=task_type),
            value("ai_worker_tasks_finished_total", type=task_type, outcome=outcome),
            value("ai_worker_task_duration_seconds_count", type=task_type, outcome=outcome))


def run_attempt(task_type: str, *outcomes: tuple[str, str | None]) -> None:
    with task_attempt(task_id="t", world_id="w", task_type=task_type, attempt=1):
        for outcome, error_type in outcomes:
            attempt_outcome(outcome, error_type)  # type: ignore[arg-type]


def test_an_attempt_is_counted_once_with_its_last_outcome_and_its_duration() -> None:
    before = attempt_counts("generate_post", "completed")
    run_attempt("generate_post", ("completed", None))
    after = attempt_counts("generate_post", "completed")
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]


def test_retries_are_counted_by_error_type() -> None:
    labels = {"type": "generate_post_image", "error_type": "provider_timeout"}
    before = value("ai_worker_task_retries_total", **labels)
    finished = value("ai_worker_tasks_finished_total", type="generate_post_image", outcome="retrying")
    run_attempt("generate_post_image", ("retrying", "provider_timeout"))
    assert value("ai_worker_task_retries_total", **labels) == before + 1
    assert value("ai_worker_tasks_finished_total", type="generate_post_image", outcome="retrying") == finished + 1


def test_an_attempt_without_an_outcome_is_abandoned_even_when_it_raises() -> None:
    before = attempt_counts("generate_character", "abandoned")
    run_attempt("generate_character")  # a lost lease: the engine returns without a word
    with pytest.raises(asyncio.CancelledError), task_attempt(  # a shutdown interrupts it
            task_id="t", world_id="w", task_type="generate_character", attempt=2):
        raise asyncio.CancelledError
    after = attempt_counts("generate_character", "abandoned")
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 2, 2]


def test_unknown_task_types_share_one_label() -> None:
    before = value("ai_worker_tasks_finished_total", type="unknown", outcome="quarantined")
    metrics.task_finished("a type nobody registered", "quarantined")
    metrics.task_finished(None, "quarantined")
    assert value("ai_worker_tasks_finished_total", type="unknown", outcome="quarantined") == before + 2
    assert "a type nobody registered" not in metrics_text()


def test_outcome_outside_an_attempt_does_nothing() -> None:
    attempt_outcome("completed")  # no attempt: nothing to count, nothing raised


# --- gRPC, worlds, reconciler ----------------------------------------------------------------------------------
def test_grpc_codes() -> None:
    assert metrics.grpc_code_name(None, failed=False) == "OK"
    assert metrics.grpc_code_name(14, failed=True) == "UNAVAILABLE"
    assert metrics.grpc_code_name(grpc.StatusCode.INVALID_ARGUMENT.value[0], failed=True) == "INVALID_ARGUMENT"
    assert metrics.grpc_code_name(None, failed=True) == "UNRESOLVED"
    assert metrics.grpc_code_name(999, failed=True) == "unknown"


def test_grpc_call_is_counted_and_timed() -> None:
    labels = {"service": "post-service", "method": "CreateAIPost"}
    before = value("ai_worker_grpc_calls_total", code="UNAVAILABLE", **labels)
    count = value("ai_worker_grpc_call_seconds_count", **labels)
    metrics.observe_grpc("post-service", "CreateAIPost", 0.0, status_code=14, failed=True)
    assert value("ai_worker_grpc_calls_total", code="UNAVAILABLE", **labels) == before + 1
    assert value("ai_worker_grpc_call_seconds_count", **labels) == count + 1


def test_worlds_reconciler_and_leases() -> None:
    before = (value("ai_worker_worlds_finished_total", status="completed"),
              value("ai_worker_reconciler_republished_total", reason="expired_lease"),
              value("ai_worker_lease_expiries_total"))
    metrics.world_finished("completed")
    metrics.republished("expired_lease")
    metrics.lease_expired()
    after = (value("ai_worker_worlds_finished_total", status="completed"),
             value("ai_worker_reconciler_republished_total", reason="expired_lease"),
             value("ai_worker_lease_expiries_total"))
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]


# --- consumer lag ---------------------------------------------------------------------------------------------
class FakeConsumer:
    def __init__(self) -> None:
        self.assigned = {TopicPartition("lag-topic", 0), TopicPartition("lag-topic", 1)}
        self.highwaters: dict[TopicPartition, int | None] = {TopicPartition("lag-topic", 0): 10,
                                                               TopicPartition("lag-topic", 1): None}
        self.positions = {TopicPartition("lag-topic", 0): 4, TopicPartition("lag-topic", 1): 0}

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.highwaters.get(tp)

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]


async def test_consumer_lag_per_partition_and_forgotten_when_revoked() -> None:
    consumer = FakeConsumer()
    lag = metrics.ConsumerLag(consumer, every_s=0)
    await lag.refresh()
    assert value("ai_worker_consumer_lag", topic="lag-topic", partition="0") == 6
    assert REGISTRY.get_sample_value("ai_worker_consumer_lag", {"topic": "lag-topic", "partition": "1"}) is None
    consumer.highwaters[TopicPartition("lag-topic", 1)] = 3  # fetched now
    consumer.assigned.discard(TopicPartition("lag-topic", 0))  # revoked
    await lag.refresh()
    assert value("ai_worker_consumer_lag", topic="lag-topic", partition="1") == 3
    assert REGISTRY.get_sample_value("ai_worker_consumer_lag", {"topic": "lag-topic", "partition": "0"}) is None


async def test_consumer_lag_is_throttled_and_never_raises() -> None:
    consumer = FakeConsumer()
    lag = metrics.ConsumerLag(consumer, every_s=3600)
    await lag.refresh()
    consumer.positions[TopicPartition("lag-topic", 0)] = 10
    await lag.refresh()  # within the interval: not read again
    assert value("ai_worker_consumer_lag", topic="lag-topic", partition="0") == 6

    class Broken(FakeConsumer):
        def assignment(self) -> set[TopicPartition]:
            raise RuntimeError("rebalancing")

    await metrics.ConsumerLag(Broken(), every_s=0).refresh()


async def test_a_partition_without_a_position_is_skipped_not_the_others() -> None:
    class Resetting(FakeConsumer):
        async def position(self, tp: TopicPartition) -> int:
            if tp.partition == 0:
                await asyncio.sleep(10)  # being reset: aiokafka waits for the new position
            return await super().position(tp)

    consumer = Resetting()
    consumer.assigned = {TopicPartition("lag-skip", 0), TopicPartition("lag-skip", 1)}
    consumer.highwaters = {tp: 5 for tp in consumer.assigned}
    consumer.positions = {tp: 2 for tp in consumer.assigned}
    await asyncio.wait_for(metrics.ConsumerLag(consumer, every_s=0).refresh(), 1)
    assert REGISTRY.get_sample_value("ai_worker_consumer_lag", {"topic": "lag-skip", "partition": "0"}) is None
    assert value("ai_worker_consumer_lag", topic="lag-skip", partition="1") == 3


def test_consumer_gauges_read_the_consumer_when_scraped() -> None:
    running = [3]
    metrics.watch_consumer(lambda: running[0], lambda: 7)
    assert value("ai_worker_tasks_in_flight") == 3 and value("ai_worker_events_buffered") == 7
    running[0] = 0
    assert value("ai_worker_tasks_in_flight") == 0
    metrics.watch_consumer(lambda: 0, lambda: 0)


# --- the worker status document --------------------------------------------------------------------------------
async def test_worker_status_document_is_written_and_removed() -> None:
    db = FakeDatabase()
    counters = {"in_flight": 2, "buffered": 5, "processed": 40, "dead_lettered": 1,
                "breakers": {"openrouter/google/gemini-2.5-flash": "open"}}
    reporter = WorkerStatusReporter(WorkerStatusStore(db), worker_id="w-1", counters=lambda: counters,
                                    interval_s=0.01)
    await reporter.write_once()
    doc = db[WORKERS].docs["w-1"]
    assert {k: doc[k] for k in counters} == counters
    assert doc["updated_at"] >= doc["started_at"] and doc["pid"] > 0 and doc["host"]
    stats = reporter.stats()
    assert stats["worker_id"] == "w-1" and stats["processed"] == 40 and isinstance(stats["updated_at"], str)
    assert set(stats) == (set(doc) - {"_id"}) | {"worker_id"}

    first = doc["updated_at"]
    counters["processed"] = 41
    reporter.start()
    for _ in range(200):
        if db[WORKERS].docs.get("w-1", {}).get("processed") == 41:
            break
        await asyncio.sleep(0.01)
    assert db[WORKERS].docs["w-1"]["updated_at"] > first
    await reporter.close()
    assert "w-1" not in db[WORKERS].docs
    assert ttl_s(10) == 300 and ttl_s(60) == 600
