"""TaskConsumer driven directly against the session's broker, with a fake handler. Only its observable
guarantees are asserted (its scheduling is free to change): a commit never passes an unfinished offset, every
message is handled at least once, unfinished work is redelivered after a stop, bad messages are dead-lettered
once with their reason and source in the headers, a failing handler or a failing dead-letter publish never
stops the loop, and no more than `max_in_flight` handlers run at once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from structlog.testing import capture_logs
from support import eventually, read_topic, unique_name

from ai_worker.devstack.processes import create_topics
from ai_worker.devstack.stack import StackInfo
from ai_worker.messaging.consumer import TaskConsumer
from ai_worker.messaging.events import BadMessage, TaskEvent, task_created
from ai_worker.messaging.producer import EventProducer

pytestmark = pytest.mark.integration


@dataclass
class Topics:
    bootstrap: str
    tasks: str
    progress: str
    dlq: str
    group: str = field(default_factory=lambda: unique_name("group"))


@pytest.fixture
async def topics(stack_info: StackInfo) -> Topics:
    t = Topics(stack_info.kafka_bootstrap, unique_name("tasks"), unique_name("progress"), unique_name("dlq"))
    await create_topics(t.bootstrap, [t.tasks, t.progress, t.dlq], 2)
    return t


@pytest.fixture
async def producer(topics: Topics) -> AsyncIterator[EventProducer]:
    p = EventProducer(bootstrap=[topics.bootstrap], tasks_topic=topics.tasks, progress_topic=topics.progress,
                      dlq_topic=topics.dlq)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


async def produce_to(bootstrap: str, topic: str, partition: int, values: list[bytes]) -> list[int]:
    """Produce to one partition; returns the offsets."""
    p = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await p.start()
    try:
        return [(await p.send_and_wait(topic, v, partition=partition)).offset for v in values]
    finally:
        await p.stop()


def event(task_id: str) -> bytes:
    return task_created(task_id, "generate_post", "world").to_bytes()


async def committed(topics: Topics, partition: int) -> int | None:
    """The group's committed offset of one partition, read by a separate client that does not join."""
    c = AIOKafkaConsumer(bootstrap_servers=topics.bootstrap, group_id=topics.group, enable_auto_commit=False)
    await c.start()
    try:
        value: int | None = await c.committed(TopicPartition(topics.tasks, partition))
        return value
    finally:
        await c.stop()


class Running:
    """A TaskConsumer running in the background until `stop()`."""

    def __init__(self, topics: Topics, handler: Callable[[TaskEvent], Awaitable[None]], producer: Any, *,
                 max_in_flight: int = 8, drain_timeout_s: float = 5.0) -> None:
        self.consumer = TaskConsumer(bootstrap=[topics.bootstrap], topic=topics.tasks, group_id=topics.group,
                                     handler=handler, producer=producer, max_in_flight=max_in_flight,
                                     drain_timeout_s=drain_timeout_s, session_timeout_ms=2000,
                                     heartbeat_interval_ms=500)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Running:
        await self.consumer.start()
        self._task = asyncio.create_task(self.consumer.run(self._stop))
        return self

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, timeout=30)
            self._task = None
        await self.consumer.stop()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def test_commits_stop_below_unfinished_work_and_a_restart_redelivers_it(
        topics: Topics, producer: EventProducer) -> None:
    ids = [str(uuid.uuid4()) for _ in range(12)]
    offsets = await produce_to(topics.bootstrap, topics.tasks, 0, [event(i) for i in ids])
    slow = ids[3]  # finishes last: everything after it completes first
    handled: list[str] = []
    gate = asyncio.Event()

    async def handler(e: TaskEvent) -> None:
        if e.task_id == slow:
            await gate.wait()
        handled.append(e.task_id)

    with capture_logs() as logs:
        first = Running(topics, handler, producer, drain_timeout_s=0.5)
        async with first:
            await eventually(lambda: _async(len(set(handled)) == len(ids) - 1), timeout_s=30,
                             what="every message but the slow one handled")
            # The commit reaches the slow message's offset and never passes it while it is unfinished.
            assert await eventually(lambda: _committed_is(topics, offsets[3]), timeout_s=10,
                                    what=f"commit of offset {offsets[3]}")
            assert await committed(topics, 0) == offsets[3]
        # Stopped with the slow message still running: the drain timed out and left it uncommitted.
    assert slow not in handled
    assert any(x["event"].startswith("drain timed out") for x in logs), [x["event"] for x in logs]
    assert await committed(topics, 0) == offsets[3]

    # A new consumer of the group gets the unfinished message again (and the finished ones after it: at least
    # once), and commits past the end once everything is done.
    gate.set()
    async with Running(topics, handler, producer):
        await eventually(lambda: _async(slow in handled), timeout_s=30, what="the slow message redelivered")
        assert await eventually(lambda: _committed_is(topics, offsets[-1] + 1), timeout_s=10, what="final commit")
    assert set(handled) == set(ids)


async def test_bad_messages_are_dead_lettered_once_and_failures_do_not_stop_the_loop(
        topics: Topics, producer: EventProducer) -> None:
    missing, broken, good = (str(uuid.uuid4()) for _ in range(3))
    values = [b"not json {", event(missing), event(broken), event(good)]
    offsets = await produce_to(topics.bootstrap, topics.tasks, 1, values)
    handled: list[str] = []

    async def handler(e: TaskEvent) -> None:
        if e.task_id == missing:
            raise BadMessage(f"unknown task id {e.task_id}: no such task document")
        if e.task_id == broken:
            raise RuntimeError("database unavailable")  # infrastructure: not the message's fault
        handled.append(e.task_id)

    with capture_logs() as logs:
        async with Running(topics, handler, producer) as running:
            await eventually(lambda: _committed_is(topics, offsets[-1] + 1, partition=1), timeout_s=30,
                             what="commit past every message")
            assert handled == [good]
            assert running.consumer.dead_lettered == 2
    dead = await read_topic(topics.bootstrap, topics.dlq, expect=2, timeout_s=10)
    assert len(dead) == 2, "each bad message is dead-lettered exactly once"
    by_offset = {}
    for m in dead:
        h = {k: v.decode() for k, v in m.headers}
        assert h["x-dlq-source-topic"] == topics.tasks and h["x-dlq-source-partition"] == "1"
        assert "x-dlq-time" in h
        by_offset[int(h["x-dlq-source-offset"])] = (h["x-dlq-reason"], m.value)
    assert by_offset[offsets[0]][0].startswith("not JSON") and by_offset[offsets[0]][1] == b"not json {"
    assert by_offset[offsets[1]][0].startswith("unknown task id") and by_offset[offsets[1]][1] == values[1]
    failed = [x for x in logs if x["event"].startswith("message handling failed")]
    assert len(failed) == 1 and failed[0]["error_type"] == "RuntimeError" and failed[0]["offset"] == offsets[2]


class BrokenDeadLetters:
    """A producer whose dead-letter topic cannot be written."""

    calls = 0

    async def send_dead_letter(self, **kwargs: Any) -> None:
        self.calls += 1
        raise ConnectionError("dead-letter topic unavailable")


async def test_a_failing_dead_letter_publish_skips_the_message_and_goes_on(topics: Topics) -> None:
    good = str(uuid.uuid4())
    offsets = await produce_to(topics.bootstrap, topics.tasks, 0, [b"\xff garbage", event(good)])
    handled: list[str] = []

    async def handler(e: TaskEvent) -> None:
        handled.append(e.task_id)

    broken = BrokenDeadLetters()
    with capture_logs() as logs:
        async with Running(topics, handler, broken) as running:
            await eventually(lambda: _committed_is(topics, offsets[-1] + 1), timeout_s=30, what="commit past both")
            assert handled == [good] and running.consumer.dead_lettered == 0
    assert broken.calls == 1
    skipped = [x for x in logs if x["event"].startswith("dead-letter publish failed")]
    assert len(skipped) == 1 and skipped[0]["offset"] == offsets[0] and "not JSON" in skipped[0]["reason"]


async def test_no_more_than_max_in_flight_handlers_run_at_once(topics: Topics, producer: EventProducer) -> None:
    ids = [str(uuid.uuid4()) for _ in range(10)]
    await produce_to(topics.bootstrap, topics.tasks, 0, [event(i) for i in ids[:5]])
    await produce_to(topics.bootstrap, topics.tasks, 1, [event(i) for i in ids[5:]])
    running_now, peak, handled = 0, 0, []
    gate = asyncio.Event()

    async def handler(e: TaskEvent) -> None:
        nonlocal running_now, peak
        running_now += 1
        peak = max(peak, running_now)
        try:
            await gate.wait()
            handled.append(e.task_id)
        finally:
            running_now -= 1

    async with Running(topics, handler, producer, max_in_flight=3):
        await eventually(lambda: _async(running_now == 3), timeout_s=30, what="three handlers running")
        # The bound holds while the others wait: give the loop a few polls to over-dispatch, if it would.
        for _ in range(10):
            await asyncio.sleep(0.05)
            assert running_now <= 3
        gate.set()
        await eventually(lambda: _async(len(handled) == len(ids)), timeout_s=30, what="all handled")
    assert peak == 3 and sorted(handled) == sorted(ids)


async def _async(value: bool) -> bool:
    return value


async def _committed_is(topics: Topics, offset: int, partition: int = 0) -> bool:
    return await committed(topics, partition) == offset
