"""Operator tools for the dead-letter topic: list what is there, replay it onto the tasks topic.

Replay reads the DLQ under its own group id (so a message is replayed once per group), strips the
`x-dlq-*` headers and re-publishes the original bytes and key; the worker then handles them again (a
message that is still bad simply returns to the DLQ)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ai_worker.connectivity import start_kafka

DLQ_HEADER_PREFIX = "x-dlq-"
DEFAULT_TIMEOUT_S = 15.0


@dataclass
class DeadLetter:
    partition: int
    offset: int
    reason: str
    source: str
    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes]]


def _to_dead_letter(msg: object) -> DeadLetter:
    headers = list(getattr(msg, "headers", None) or [])
    h = {k: v for k, v in headers}
    source = (f"{h.get('x-dlq-source-topic', b'?').decode(errors='replace')}:"
              f"{h.get('x-dlq-source-partition', b'?').decode(errors='replace')}@"
              f"{h.get('x-dlq-source-offset', b'?').decode(errors='replace')}")
    return DeadLetter(
        partition=int(getattr(msg, "partition", -1)), offset=int(getattr(msg, "offset", -1)),
        reason=h.get("x-dlq-reason", b"").decode(errors="replace"), source=source,
        value=getattr(msg, "value", None), key=getattr(msg, "key", None), headers=headers,
    )


def original_headers(letter: DeadLetter) -> list[tuple[str, bytes]]:
    """The message's headers as they were before it was dead-lettered (without the `x-dlq-*` ones)."""
    return [(k, v) for k, v in letter.headers if not k.startswith(DLQ_HEADER_PREFIX)]


def _request_timeout_ms(timeout_s: float) -> int:
    return max(int(timeout_s * 1000), 1000)


async def read_dead_letters(bootstrap: Sequence[str], dlq_topic: str, group_id: str | None, limit: int,
                            idle_s: float = 1.5, *, options: Mapping[str, Any] | None = None,
                            timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[AIOKafkaConsumer, list[DeadLetter]]:
    """Read up to `limit` dead letters, from the group's committed position (or the start) of every
    partition; the caller stops the returned consumer (`dead_letter_reader` does it for you). Partitions are
    assigned, not subscribed: no group join, so no rebalance waits; the group id only names where replay
    positions are committed. `options`: Kafka security settings (messaging.security.kafka_options);
    connecting is bounded by `timeout_s` (raises connectivity.Unreachable)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=list(bootstrap), group_id=group_id, enable_auto_commit=False,
                                auto_offset_reset="earliest", request_timeout_ms=_request_timeout_ms(timeout_s),
                                **dict(options or {}))
    try:
        await start_kafka(consumer.start, bootstrap, timeout_s)
        return consumer, await _read(consumer, dlq_topic, group_id, limit, idle_s)
    except BaseException:  # a failed start or a cancelled read (a caller's timeout) leaves no consumer open
        await consumer.stop()
        raise


@contextlib.asynccontextmanager
async def dead_letter_reader(bootstrap: Sequence[str], dlq_topic: str, group_id: str | None, limit: int, *,
                             options: Mapping[str, Any] | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                             idle_s: float = 1.5) -> AsyncIterator[tuple[AIOKafkaConsumer, list[DeadLetter]]]:
    """`read_dead_letters` whose consumer is stopped when the block ends, whatever happens in it."""
    consumer, letters = await read_dead_letters(bootstrap, dlq_topic, group_id, limit, idle_s, options=options,
                                                timeout_s=timeout_s)
    try:
        yield consumer, letters
    finally:
        await consumer.stop()


async def _read(consumer: AIOKafkaConsumer, dlq_topic: str, group_id: str | None, limit: int,
                idle_s: float) -> list[DeadLetter]:
    await consumer.topics()  # fetch metadata
    tps = [TopicPartition(dlq_topic, p) for p in sorted(consumer.partitions_for_topic(dlq_topic) or ())]
    out: list[DeadLetter] = []
    if not tps:
        return out
    consumer.assign(tps)
    from_start = []
    for tp in tps:
        committed = await consumer.committed(tp) if group_id else None
        if committed is None:
            from_start.append(tp)
        else:
            consumer.seek(tp, committed)
    if from_start:  # one call for all: each call waits a fetch round, so one per partition took seconds
        await consumer.seek_to_beginning(*from_start)
    idle_polls = 0
    while len(out) < limit and idle_polls * 0.5 < idle_s:
        batch = await consumer.getmany(timeout_ms=500, max_records=limit - len(out))
        if not batch:
            idle_polls += 1
            continue
        idle_polls = 0
        for msgs in batch.values():
            out.extend(_to_dead_letter(m) for m in msgs)
    return out


async def replay(bootstrap: Sequence[str], dlq_topic: str, tasks_topic: str, group_id: str, limit: int, *,
                 options: Mapping[str, Any] | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[DeadLetter]:
    """Re-publish up to `limit` dead letters onto `tasks_topic`, then commit the group's position after them."""
    async with dead_letter_reader(bootstrap, dlq_topic, group_id, limit, options=options,
                                  timeout_s=timeout_s) as (consumer, letters):
        if not letters:
            return letters
        producer = AIOKafkaProducer(bootstrap_servers=list(bootstrap), acks="all",
                                    request_timeout_ms=_request_timeout_ms(timeout_s), **dict(options or {}))
        try:
            await start_kafka(producer.start, bootstrap, timeout_s)
            for letter in letters:
                await producer.send_and_wait(tasks_topic, letter.value, key=letter.key,
                                             headers=original_headers(letter) or None)
        finally:
            await producer.stop()
        last: dict[TopicPartition, int] = {}
        for letter in letters:
            tp = TopicPartition(dlq_topic, letter.partition)
            last[tp] = max(last.get(tp, -1), letter.offset + 1)
        await consumer.commit(last)  # the group's position after what was replayed
        return letters


async def replay_one(bootstrap: Sequence[str], dlq_topic: str, tasks_topic: str, partition: int, offset: int,
                     fetch_s: float = 5.0, *, options: Mapping[str, Any] | None = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> DeadLetter | None:
    """Re-publish the one dead letter at `partition`@`offset` onto the tasks topic (the console's replay
    button). No group is used and nothing is committed. None when there is no message at that position."""
    consumer = AIOKafkaConsumer(bootstrap_servers=list(bootstrap), enable_auto_commit=False,
                                auto_offset_reset="earliest", request_timeout_ms=_request_timeout_ms(timeout_s),
                                **dict(options or {}))
    letter: DeadLetter | None = None
    try:
        await start_kafka(consumer.start, bootstrap, timeout_s)
        await consumer.topics()  # fetch metadata
        tp = TopicPartition(dlq_topic, partition)
        if partition in (consumer.partitions_for_topic(dlq_topic) or ()):
            consumer.assign([tp])
            consumer.seek(tp, offset)
            deadline = asyncio.get_running_loop().time() + fetch_s
            while letter is None and asyncio.get_running_loop().time() < deadline:
                msgs = (await consumer.getmany(tp, timeout_ms=500, max_records=1)).get(tp, [])
                if msgs:
                    if msgs[0].offset != offset:  # gone (retention) or past the end: reset elsewhere
                        break
                    letter = _to_dead_letter(msgs[0])
    finally:
        await consumer.stop()
    if letter is None:
        return None
    producer = AIOKafkaProducer(bootstrap_servers=list(bootstrap), acks="all",
                                request_timeout_ms=_request_timeout_ms(timeout_s), **dict(options or {}))
    try:
        await start_kafka(producer.start, bootstrap, timeout_s)
        await producer.send_and_wait(tasks_topic, letter.value, key=letter.key,
                                     headers=original_headers(letter) or None)
    finally:
        await producer.stop()
    return letter
