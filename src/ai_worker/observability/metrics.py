"""Prometheus metrics of the worker (served at GET /metrics of the health endpoint; README "Metrics").

Every family is defined here, with the small functions the engine, the consumer, the reconciler, the budget
and the platform clients call (one line each at the call site). Label values come only from bounded sets:
task types from the job registry (anything else is counted as "unknown"), error types from the worker's error
classes, fixed categories (outcomes, dead-letter reasons, refusal kinds), the platform's service and method
names, models from the model registry. Free text (a dead-letter reason, an error message) never becomes a
label. Everything here is an in-process counter update: no I/O, no database round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, Literal

import grpc
import structlog
from aiokafka.errors import KafkaError
from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

from ai_worker.messaging.events import TaskType
from ai_worker.observability import tracing

if TYPE_CHECKING:
    from ai_worker.providers.history import ApiRequestRecord

log = structlog.get_logger(__name__)

# No `*_created` series: they double the scrape and nothing here needs a counter's creation time.
disable_created_metrics()  # type: ignore[no-untyped-call]

UNKNOWN: Final = "unknown"
MAX_LABEL: Final = 64

# --- provider calls (LLM, image) --------------------------------------------------------------------
PROVIDER_REQUESTS = Counter(
    "ai_worker_provider_requests_total", "Provider request attempts (LLM, image)",
    ["api_type", "model", "status", "fallback"])
PROVIDER_LATENCY = Histogram(
    "ai_worker_provider_request_seconds", "Latency of provider request attempts", ["api_type", "model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120))
PROVIDER_TOKENS = Counter("ai_worker_provider_tokens_total", "Tokens used", ["model", "kind"])
PROVIDER_COST = Counter("ai_worker_provider_cost_usd_total", "Cost of provider calls, USD", ["api_type", "model"])

# --- tasks ----------------------------------------------------------------------------------------------
Outcome = Literal["completed", "failed", "retrying", "cancelled", "abandoned", "quarantined"]
OUTCOMES: Final[tuple[Outcome, ...]] = ("completed", "failed", "retrying", "cancelled", "abandoned", "quarantined")

TASKS_STARTED = Counter("ai_worker_tasks_started_total", "Task attempts started (claimed and run)", ["type"])
TASKS_FINISHED = Counter(
    "ai_worker_tasks_finished_total",
    "Task attempts finished, by outcome (completed, failed, retrying, cancelled, abandoned, quarantined)",
    ["type", "outcome"])
TASK_DURATION = Histogram(
    "ai_worker_task_duration_seconds", "Duration of one task attempt, by type and outcome", ["type", "outcome"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900))
TASK_RETRIES = Counter("ai_worker_task_retries_total", "Task attempts that scheduled a retry, by error type",
                       ["type", "error_type"])
WORLDS_FINISHED = Counter("ai_worker_worlds_finished_total", "Worlds this worker saw end, by final status",
                          ["status"])

# --- the consumer ----------------------------------------------------------------------------------------
TASKS_IN_FLIGHT = Gauge("ai_worker_tasks_in_flight", "Events being handled right now")
EVENTS_BUFFERED = Gauge("ai_worker_events_buffered", "Events read and waiting for a task slot")
EVENTS_RECEIVED = Counter("ai_worker_events_received_total", "Messages read from the tasks topic")
CONSUMER_LAG = Gauge("ai_worker_consumer_lag",
                     "Messages not yet read per assigned partition (high-water mark - consumer position)",
                     ["topic", "partition"])

DeadLetterReason = Literal["not_json", "invalid_event", "unknown_event_type", "unknown_task", "unknown_task_type",
                           "invalid_task_document", "other"]
DEAD_LETTER_REASONS: Final[tuple[DeadLetterReason, ...]] = (
    "not_json", "invalid_event", "unknown_event_type", "unknown_task", "unknown_task_type", "invalid_task_document",
    "other")
DEAD_LETTERS = Counter("ai_worker_dead_letters_total", "Messages sent to the dead-letter topic, by reason category",
                       ["reason"])

# --- the platform (gRPC) ---------------------------------------------------------------------------------
GRPC_CALLS = Counter("ai_worker_grpc_calls_total", "Platform gRPC calls, by status code",
                     ["service", "method", "code"])
GRPC_LATENCY = Histogram("ai_worker_grpc_call_seconds", "Latency of platform gRPC calls", ["service", "method"],
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
NO_ADDRESS: Final = "UNRESOLVED"  # the call was not made: the service's address could not be found

# --- the reconciler, budgets -------------------------------------------------------------------------------
RepublishReason = Literal["due_pending", "expired_lease"]
RECONCILER_REPUBLISHED = Counter("ai_worker_reconciler_republished_total",
                                 "Task events republished by the reconciler", ["reason"])
LEASE_EXPIRIES = Counter("ai_worker_lease_expiries_total",
                         "Running tasks whose lease expired, found by the reconciler")
IDLE_WORK_TAKEN = Counter("ai_worker_idle_work_taken_total",
                          "Pending tasks taken from the database by a worker whose provider slots idled, by pool",
                          ["pool"])
RefusalKind = Literal["world_money", "world_calls", "daily", "world_not_live"]
REFUSAL_KINDS: Final[tuple[RefusalKind, ...]] = ("world_money", "world_calls", "daily", "world_not_live")
BUDGET_REFUSALS = Counter("ai_worker_budget_refusals_total", "Paid calls refused by a budget, by kind", ["kind"])

# Fixed categories start at 0, so rate() and absent-series alerts work before the first event.
for _reason in DEAD_LETTER_REASONS:
    DEAD_LETTERS.labels(_reason)
for _kind in REFUSAL_KINDS:
    BUDGET_REFUSALS.labels(_kind)
for _why in ("due_pending", "expired_lease"):
    RECONCILER_REPUBLISHED.labels(_why)
for _status in ("completed", "failed"):
    WORLDS_FINISHED.labels(_status)

_task_types: frozenset[str] = frozenset(t.value for t in TaskType)


def set_task_types(types: Iterable[str]) -> None:
    """The task types that may appear as label values (the job registry's); others count as "unknown"."""
    global _task_types
    _task_types = frozenset(types)


def task_type_label(task_type: object) -> str:
    return task_type if isinstance(task_type, str) and task_type in _task_types else UNKNOWN


def _short(value: str | None) -> str:
    return (value or UNKNOWN)[:MAX_LABEL]


# --- tasks -------------------------------------------------------------------------------------------------
def task_started(task_type: str) -> None:
    TASKS_STARTED.labels(task_type).inc()


def task_finished(task_type: object, outcome: Outcome, seconds: float | None = None) -> None:
    """One attempt ended with `outcome`; `seconds` (its duration) when it was started by this worker."""
    label = task_type_label(task_type)
    TASKS_FINISHED.labels(label, outcome).inc()
    if seconds is not None:
        TASK_DURATION.labels(label, outcome).observe(seconds)


def task_retry(task_type: str, error_type: str | None) -> None:
    TASK_RETRIES.labels(task_type, _short(error_type)).inc()


def world_finished(status: str) -> None:
    WORLDS_FINISHED.labels("completed" if status == "completed" else "failed").inc()


# --- dead letters ------------------------------------------------------------------------------------------
# Prefixes of the reasons written by messaging/events.py, the consumer and the engine.
_REASON_PREFIXES: Final[tuple[tuple[str, DeadLetterReason], ...]] = (
    ("not JSON", "not_json"),
    ("empty message", "not_json"),
    ("not a JSON object", "invalid_event"),
    ("invalid event", "invalid_event"),
    ("message too large", "invalid_event"),
    ("not a task event", "invalid_event"),
    ("unknown event_type", "unknown_event_type"),
    ("unknown task id", "unknown_task"),
    ("unknown task type", "unknown_task_type"),
    ("invalid_task_document", "invalid_task_document"),
)


def dead_letter_category(reason: str) -> DeadLetterReason:
    """The bounded category of a dead-letter reason text (the text itself goes into the message's headers)."""
    for prefix, category in _REASON_PREFIXES:
        if reason.startswith(prefix):
            return category
    return "other"


def dead_lettered(reason: str) -> None:
    DEAD_LETTERS.labels(dead_letter_category(reason)).inc()


def event_received() -> None:
    EVENTS_RECEIVED.inc()


# --- the platform ----------------------------------------------------------------------------------------
_CODE_NAMES: Final[dict[int, str]] = {
    int(c.value[0]) if isinstance(c.value, tuple) else int(c.value): c.name for c in grpc.StatusCode}


def grpc_code_name(status_code: int | None, *, failed: bool) -> str:
    """"OK", the gRPC status code's name, or UNRESOLVED when the call failed before it was made."""
    if not failed:
        return "OK"
    if status_code is None:
        return NO_ADDRESS
    return _CODE_NAMES.get(status_code, UNKNOWN)


def observe_grpc(service: str, method: str, started: float, *, status_code: int | None, failed: bool) -> None:
    """One platform call, `started` = its time.monotonic() at the start (metrics, and a span when tracing)."""
    seconds = time.monotonic() - started
    code = grpc_code_name(status_code, failed=failed)
    GRPC_CALLS.labels(service, method, code).inc()
    GRPC_LATENCY.labels(service, method).observe(seconds)
    if tracing.enabled():
        tracing.grpc_span(service, method, code, seconds)


# --- the reconciler, budgets -------------------------------------------------------------------------------
def republished(reason: RepublishReason) -> None:
    RECONCILER_REPUBLISHED.labels(reason).inc()


def lease_expired() -> None:
    LEASE_EXPIRIES.inc()


def idle_work_taken(pool: str) -> None:
    IDLE_WORK_TAKEN.labels(pool or "none").inc()


def budget_refused(kind: RefusalKind) -> None:
    BUDGET_REFUSALS.labels(kind).inc()


# --- provider calls ----------------------------------------------------------------------------------------
def observe_call(record: ApiRequestRecord) -> None:
    """Count one `ApiRequestRecord` (LLM or image generation attempts; other types are not counted here), and
    make it a span when tracing is on (uploads too; gRPC calls get theirs from `observe_grpc`)."""
    if tracing.enabled() and record.api_type != "grpc":
        tracing.record_span(record)
    if record.api_type not in ("llm", "image_generation"):
        return
    model = record.model or UNKNOWN
    PROVIDER_REQUESTS.labels(record.api_type, model, record.status, "true" if record.fallback else "false").inc()
    PROVIDER_LATENCY.labels(record.api_type, model).observe(record.duration_ms / 1000.0)
    if record.prompt_tokens:
        PROVIDER_TOKENS.labels(model, "prompt").inc(record.prompt_tokens)
    if record.completion_tokens:
        PROVIDER_TOKENS.labels(model, "completion").inc(record.completion_tokens)
    if record.cost > 0:
        PROVIDER_COST.labels(record.api_type, model).inc(record.cost)


# --- the consumer's gauges -----------------------------------------------------------------------------------
def watch_consumer(in_flight: Callable[[], int], buffered: Callable[[], int]) -> None:
    """The in-flight and buffered gauges read the consumer when scraped (nothing on the hot path)."""
    TASKS_IN_FLIGHT.set_function(in_flight)
    EVENTS_BUFFERED.set_function(buffered)


LAG_REFRESH_S: Final = 5.0
POSITION_TIMEOUT_S: Final = 0.05


class ConsumerLag:
    """`ai_worker_consumer_lag{topic,partition}` of one consumer, refreshed from its poll loop at most every
    LAG_REFRESH_S: high-water mark (aiokafka's `highwater(tp)`, known once the partition has been fetched; on
    the embedded broker `end_offsets()` is wrong, docs/EMBEDDED.md) minus the consumer's position. Partitions
    no longer assigned lose their series."""

    def __init__(self, consumer: Any, *, every_s: float = LAG_REFRESH_S) -> None:
        self._consumer = consumer
        self._every_s = every_s
        self._next = 0.0
        self._shown: set[tuple[str, str]] = set()

    async def refresh(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self._every_s
        try:
            await self._refresh()
        except Exception as exc:  # a metric must never disturb the poll loop
            log.debug("consumer lag not refreshed", error=str(exc), error_type=type(exc).__name__)

    async def _refresh(self) -> None:
        shown: set[tuple[str, str]] = set()
        for tp in list(self._consumer.assignment()):
            try:
                highwater = self._consumer.highwater(tp)
                if highwater is None:  # not fetched yet: no position to compare with either
                    continue
                # Known at once after a fetch; the bound keeps a partition being reset from holding the loop.
                position = await asyncio.wait_for(self._consumer.position(tp), POSITION_TIMEOUT_S)
            except (AssertionError, TimeoutError, KafkaError):  # revoked meanwhile, or no position yet
                continue
            labels = (tp.topic, str(tp.partition))
            CONSUMER_LAG.labels(*labels).set(max(0, int(highwater) - int(position)))
            shown.add(labels)
        for labels in self._shown - shown:
            with contextlib.suppress(KeyError):
                CONSUMER_LAG.remove(*labels)
        self._shown = shown


__all__ = [
    "DEAD_LETTER_REASONS", "OUTCOMES", "REFUSAL_KINDS", "ConsumerLag", "Outcome", "budget_refused",
    "dead_letter_category", "dead_lettered", "event_received", "grpc_code_name", "lease_expired", "observe_call",
    "observe_grpc", "republished", "set_task_types", "task_finished", "task_retry", "task_started",
    "task_type_label", "watch_consumer", "world_finished",
]
