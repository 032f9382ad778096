"""Tracing (observability/tracing.py) without servers: the world's trace id, the traceparent a published event
carries (the current task's span; for a task's own retry, its attempt's parent), a consumed header as the
parent, a header of another trace kept as a link, provider and gRPC spans under the task span, and nothing at
all when tracing is off. The whole worker is traced in tests/integration/test_world_trace.py."""

from __future__ import annotations

import asyncio
import contextvars
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from ai_worker.config import load_settings
from ai_worker.observability import metrics, tracing
from ai_worker.observability.attempts import attempt_outcome, task_attempt
from ai_worker.providers.history import ApiRequestRecord

otel_sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="the tracing extra is not installed "
                               "(pip install -e '.[tracing]')")
from opentelemetry.sdk.trace import ReadableSpan  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

T = TypeVar("T")
BASE = {"MONGODB_URI": "mongodb://127.0.0.1:1", "KAFKA_BROKERS": "127.0.0.1:1", "OPENROUTER_API_KEY": "sk-test",
        "RUNWARE_API_KEY": "rw-test"}


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    with tracing.use_exporter(exporter):
        tracing.configure(load_settings(**BASE, TRACING_ENABLED="true", TRACING_EXPORTER="none"))
        try:
            yield exporter
        finally:
            tracing.shutdown()


def in_new_message(fn: Callable[[], T]) -> T:
    """Run `fn` as the consumer runs a message: in a fresh copy of the context."""
    return contextvars.Context().run(fn)


def llm_record(world_id: str) -> ApiRequestRecord:
    return ApiRequestRecord(api_type="llm", task_id="t", world_id=world_id, request_type="post", request_data={},
                            duration_ms=250, model="google/gemini-2.5-flash", prompt_tokens=120,
                            completion_tokens=40, cost=0.0012)


def test_world_trace_id_is_the_world_uuid() -> None:
    world = uuid.uuid4()
    assert tracing.world_trace_id(str(world)) == world.int
    assert tracing.world_trace_id("not-a-uuid") == tracing.world_trace_id("not-a-uuid") != 0


def test_off_means_no_headers_no_spans() -> None:
    tracing.shutdown()
    assert not tracing.enabled()
    tracing.received([("traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01")])
    assert tracing.task_headers("t") is None
    assert tracing.start_task(task_id="t", world_id="w", task_type="generate_post", attempt=1) is None
    with task_attempt(task_id="t", world_id="w", task_type="generate_post", attempt=1):
        attempt_outcome("completed")


def test_a_world_is_one_trace_and_children_hang_under_their_parent(spans: InMemorySpanExporter) -> None:
    world = str(uuid.uuid4())
    parent_id, child_id = str(uuid.uuid4()), str(uuid.uuid4())
    headers: dict[str, Any] = {}

    def run_parent() -> None:
        tracing.received(None)  # the platform's event: no headers
        with task_attempt(task_id=parent_id, world_id=world, task_type="init_world_creation", attempt=1):
            headers["child"] = tracing.task_headers(child_id)
            attempt_outcome("completed")

    def run_child(attempt: int) -> None:
        tracing.received(headers["child"])
        with task_attempt(task_id=child_id, world_id=world, task_type="generate_world_description",
                          attempt=attempt):
            metrics.observe_call(llm_record(world))
            metrics.observe_grpc("world-service", "UpdateWorldParams", 0.0, status_code=None, failed=False)
            headers["retry"] = tracing.task_headers(child_id)  # its own retry
            attempt_outcome("retrying", "provider_timeout")

    in_new_message(run_parent)
    assert headers["child"] and headers["child"][0][0] == "traceparent"
    in_new_message(lambda: run_child(1))
    headers["child"] = headers["retry"]
    in_new_message(lambda: run_child(2))

    finished: list[ReadableSpan] = list(spans.get_finished_spans())
    assert {s.context.trace_id for s in finished} == {uuid.UUID(world).int}
    by_name: dict[str, list[ReadableSpan]] = {}
    for s in finished:
        by_name.setdefault(s.name, []).append(s)
    (root,) = by_name["task init_world_creation"]
    assert root.parent is None
    assert root.attributes is not None and root.attributes["task.outcome"] == "completed"
    children = by_name["task generate_world_description"]
    assert len(children) == 2  # two attempts, siblings under the parent task
    assert all(c.parent is not None and c.parent.span_id == root.context.span_id for c in children)
    assert sorted(c.attributes["task.attempt"] for c in children if c.attributes) == [1, 2]
    assert all(c.attributes and c.attributes["task.outcome"] == "retrying" for c in children)
    assert all(c.attributes and c.attributes["error.type"] == "provider_timeout" for c in children)
    child_ids = {c.context.span_id for c in children}
    llm = by_name["llm post"]
    assert len(llm) == 2 and {s.parent.span_id for s in llm if s.parent} == child_ids
    assert llm[0].attributes is not None and llm[0].attributes["provider.model"] == "google/gemini-2.5-flash"
    assert llm[0].attributes["provider.tokens.prompt"] == 120
    assert llm[0].end_time is not None and llm[0].start_time is not None
    assert llm[0].end_time - llm[0].start_time == pytest.approx(250_000_000, rel=0.01)
    grpc_spans = by_name["world-service/UpdateWorldParams"]
    assert len(grpc_spans) == 2 and {s.parent.span_id for s in grpc_spans if s.parent} == child_ids
    assert grpc_spans[0].attributes is not None and grpc_spans[0].attributes["rpc.grpc.code"] == "OK"


def test_a_header_of_another_trace_is_a_link_not_the_parent(spans: InMemorySpanExporter) -> None:
    world = str(uuid.uuid4())
    foreign = f"00-{'ab' * 16}-{'cd' * 8}-01"

    def run() -> None:
        tracing.received([("traceparent", foreign.encode())])
        with task_attempt(task_id="t", world_id=world, task_type="init_world_creation", attempt=1):
            attempt_outcome("failed", "invalid_parameters")

    in_new_message(run)
    (span,) = spans.get_finished_spans()
    assert span.parent is None and span.context.trace_id == uuid.UUID(world).int
    assert [link.context.trace_id for link in span.links] == [int("ab" * 16, 16)]
    assert span.status.status_code.name == "ERROR"


def test_outside_a_task_the_received_header_is_passed_on(spans: InMemorySpanExporter) -> None:
    header = f"00-{'12' * 16}-{'34' * 8}-01"

    def republish() -> list[tuple[str, bytes]] | None:
        tracing.received([("traceparent", header.encode())])
        return tracing.task_headers("t")  # a task not due yet, published again later

    assert in_new_message(republish) == [("traceparent", header.encode())]
    assert in_new_message(lambda: tracing.task_headers("t")) is None  # the reconciler: nothing to pass on
    metrics.observe_call(llm_record("w"))  # a call outside any task makes no orphan span
    assert spans.get_finished_spans() == ()


async def test_spans_follow_asyncio_tasks(spans: InMemorySpanExporter) -> None:
    """Each message runs in its own asyncio task: two attempts at once keep their own spans."""
    world = str(uuid.uuid4())

    async def run(task_id: str) -> None:
        with task_attempt(task_id=task_id, world_id=world, task_type="generate_post", attempt=1):
            await asyncio.sleep(0.01)
            metrics.observe_call(llm_record(world))
            attempt_outcome("completed")

    await asyncio.gather(asyncio.create_task(run("a")), asyncio.create_task(run("b")))
    finished = spans.get_finished_spans()
    tasks = {s.attributes["task.id"]: s.context.span_id for s in finished if s.name == "task generate_post"
             and s.attributes}
    calls = [s for s in finished if s.name == "llm post"]
    assert len(tasks) == 2 and sorted(s.parent.span_id for s in calls if s.parent) == sorted(tasks.values())


def test_missing_exporter_package_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from ai_worker.config import ConfigError

    monkeypatch.setattr(tracing, "OTLP_MODULE", "ai_worker_no_such_module.exporter")
    with pytest.raises(ConfigError, match=r"TRACING_ENABLED.*tracing-otlp"):
        load_settings(**BASE, TRACING_ENABLED="true")
    assert load_settings(**BASE, TRACING_ENABLED="true", TRACING_EXPORTER="console").tracing_exporter == "console"
    assert load_settings(**BASE, OTEL_TRACES_ENABLED="true", TRACING_EXPORTER="none").tracing_enabled
    assert not load_settings(**BASE).tracing_enabled  # off by default
