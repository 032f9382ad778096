"""Tracing of a whole world (README "Tracing"): the worker runs in this process (`run_worker` as an asyncio task
on the session's stack) with the SDK's in-memory exporter, makes a 2-character / 2-post world, and the spans
must form the world's tree: one trace (the world id's bits), `task init_world_creation` at the top, each task
under the task that spawned it (the traceparent header of its event), the LLM, image and gRPC calls under the
task that made them, one task span per attempt."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from support import WorkerEnv, mongo, wait_world

from ai_worker.app import run_worker
from ai_worker.client import send_world
from ai_worker.config import load_settings
from ai_worker.observability import tracing

pytest.importorskip("opentelemetry.sdk.trace", reason="the tracing extra is not installed: pip install -e "
                    "'.[tracing]' (the test extra includes it)")
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

# Who spawns whom (README "How a world is generated").
PARENT = {
    "generate_world_description": "init_world_creation",
    "generate_world_image": "generate_world_description",
    "generate_character_batch": "generate_world_description",
    "generate_character": "generate_character_batch",
    "generate_character_avatar": "generate_character",
    "generate_post_batch": "generate_character",
    "generate_post": "generate_post_batch",
    "generate_post_image": "generate_post",
}
EXPECTED_TASKS = {"init_world_creation": 1, "generate_world_description": 1, "generate_world_image": 1,
                  "generate_character_batch": 1, "generate_character": 2, "generate_character_avatar": 2,
                  "generate_post_batch": 2, "generate_post": 2, "generate_post_image": 2}


@contextlib.contextmanager
def signals_kept() -> Iterator[None]:
    """run_worker installs SIGTERM/SIGINT handlers (and ignores a late SIGTERM): give pytest its own back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        loop = asyncio.get_running_loop()
        for sig, handler in saved.items():
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
            signal.signal(sig, handler)


def attr(span: ReadableSpan, key: str) -> Any:
    return (span.attributes or {}).get(key)


async def test_a_world_is_one_trace_with_the_task_tree(wenv: WorkerEnv) -> None:
    await wenv.create_topics()
    settings = load_settings(**{
        **wenv.info.worker_env(group_id=f"group-{wenv.suffix}"),
        "MONGODB_DATABASE": wenv.database, "KAFKA_TOPIC_TASKS": wenv.tasks_topic,
        "KAFKA_TOPIC_PROGRESS": wenv.progress_topic, "KAFKA_TOPIC_DLQ": wenv.dlq_topic, "SERVICE_PORT": "0",
        "WORKER_ID": f"traced-{wenv.suffix}", "TRACING_ENABLED": "true", "TRACING_EXPORTER": "none",
    })
    exporter = InMemorySpanExporter()
    stop = asyncio.Event()
    client = mongo(wenv.info)
    with signals_kept(), tracing.use_exporter(exporter):
        worker = asyncio.create_task(run_worker(settings, stop))
        try:
            world_id, _ = await send_world(kafka=wenv.info.kafka_bootstrap, mongo_uri=wenv.info.mongo_uri,
                                           database=wenv.database, topic=wenv.tasks_topic,
                                           prompt="A harbour town of glass boats", users=2, posts=2)
            status = await wait_world(client, wenv.database, world_id, timeout_s=120)
            assert status["status"] == "completed", status
            tasks = [t async for t in client[wenv.database]["tasks"].find({"world_id": world_id})]
        finally:
            stop.set()
            await asyncio.wait_for(worker, 60)
            await client.close()
    assert not tracing.enabled()  # shut down with the worker

    spans = list(exporter.get_finished_spans())
    assert {s.context.trace_id for s in spans} == {uuid.UUID(world_id).int}
    by_id = {s.context.span_id: s for s in spans}
    task_spans = [s for s in spans if s.name.startswith("task ")]

    # One span per attempt; every task completed exactly once.
    assert len(task_spans) == sum(t["attempt_count"] for t in tasks)
    completed = Counter(attr(s, "task.type") for s in task_spans if attr(s, "task.outcome") == "completed")
    assert completed == Counter(EXPECTED_TASKS)
    assert {attr(s, "task.id") for s in task_spans} == {t["_id"] for t in tasks}
    assert all(attr(s, "world.id") == world_id for s in task_spans)

    # The top, and every task under the task that spawned it.
    roots = [s for s in spans if s.parent is None]
    assert [s.name for s in roots] == ["task init_world_creation"]
    for span in task_spans:
        task_type = attr(span, "task.type")
        if task_type == "init_world_creation":
            continue
        assert span.parent is not None, span.name
        parent = by_id[span.parent.span_id]
        assert attr(parent, "task.type") == PARENT[task_type], (span.name, parent.name)
        assert parent.start_time is not None and span.start_time is not None
        assert parent.start_time <= span.start_time

    # Calls under the task that made them.
    def parent_type(span: ReadableSpan) -> str:
        assert span.parent is not None, span.name
        return str(attr(by_id[span.parent.span_id], "task.type"))

    llm = [s for s in spans if s.name.startswith("llm ")]
    assert llm and {parent_type(s) for s in llm} == {"generate_world_description", "generate_character_batch",
                                                     "generate_post_batch", "generate_post"}
    assert all(attr(s, "provider.model") and attr(s, "provider.tokens.prompt", ) > 0 for s in llm)
    images = [s for s in spans if s.name.startswith("image ")]
    assert len([s for s in images if attr(s, "provider.status") == "ok"]) == 2 + 2 + 2
    assert {parent_type(s) for s in images} == {"generate_world_image", "generate_character_avatar",
                                                "generate_post_image"}
    grpc_calls = Counter((s.name, parent_type(s)) for s in spans if attr(s, "rpc.system") == "grpc"
                         and attr(s, "rpc.grpc.code") == "OK")
    assert grpc_calls[("character-service/CreateCharacter", "generate_character")] == 2
    assert grpc_calls[("character-service/UpdateCharacter", "generate_character_avatar")] == 2
    assert grpc_calls[("post-service/CreateAIPost", "generate_post_image")] == 2
    assert grpc_calls[("world-service/UpdateWorldParams", "generate_world_description")] == 1
    assert grpc_calls[("media-service/ConfirmUpload", "generate_post_image")] == 2
    for call in spans:
        if call.kind.name == "CLIENT":  # calls sit inside their task's time
            task = by_id[call.parent.span_id] if call.parent else None
            assert task is not None and task.start_time is not None and task.end_time is not None
            assert call.end_time is not None and call.end_time <= task.end_time + 1_000_000
