"""Operator tools for the dead-letter topic: list what is there, replay it onto the tasks topic.

Replay reads the DLQ under its own group id (so a message is replayed once per group), strips the
`x-dlq-*` headers and re-publishes the original bytes and key; the worker then handles them again (a
message that is still bad simply returns to the DLQ)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

DLQ_HEADER_PREFIX = "x-dlq-"


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


async def read_dead_letters(bootstrap: Sequence[str], dlq_topic: str, group_id: str | None, limit: int,
                            idle_s: float = 1.5) -> tuple[AIOKafkaConsumer, list[DeadLetter]]:
    """Read up to `limit` dead letters, from the group's committed position (or the start) of every
    partition. Partitions are assigned, not subscribed: no group join, so no rebalance waits; the group
    id only names where replay positions are committed."""
    consumer = AIOKafkaConsumer(bootstrap_servers=list(bootstrap), group_id=group_id, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    try:
        return consumer, await _read(consumer, dlq_topic, group_id, limit, idle_s)
    except BaseException:  # a failed start or a cancelled read (a caller's timeout) leaves no consumer open
        await consumer.stop()
        raise


async def _read(consumer: AIOKafkaConsumer, dlq_topic: str, group_id: str | None, limit: int,
                idle_s: float) -> list[DeadLetter]:
    await consumer.start()
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


async def replay(bootstrap: Sequence[str], dlq_topic: str, tasks_topic: str, group_id: str,
                 limit: int) -> list[DeadLetter]:
    consumer, letters = await read_dead_letters(bootstrap, dlq_topic, group_id, limit)
    producer = AIOKafkaProducer(bootstrap_servers=list(bootstrap), acks="all")
    await producer.start()
    try:
        for letter in letters:
            await producer.send_and_wait(tasks_topic, letter.value, key=letter.key,
                                         headers=original_headers(letter) or None)
        if letters:
            last: dict[TopicPartition, int] = {}
            for letter in letters:
                tp = TopicPartition(dlq_topic, letter.partition)
                last[tp] = max(last.get(tp, -1), letter.offset + 1)
            await consumer.commit(last)  # the group's position after what was replayed
    finally:
        await producer.stop()
        await consumer.stop()
    return letters


async def replay_one(bootstrap: Sequence[str], dlq_topic: str, tasks_topic: str, partition: int, offset: int,
                     fetch_s: float = 5.0) -> DeadLetter | None:
    """Re-publish the one dead letter at `partition`@`offset` onto the tasks topic (the console's replay
    button). No group is used and nothing is committed. None when there is no message at that position."""
    consumer = AIOKafkaConsumer(bootstrap_servers=list(bootstrap), enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    letter: DeadLetter | None = None
    try:
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
    producer = AIOKafkaProducer(bootstrap_servers=list(bootstrap), acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(tasks_topic, letter.value, key=letter.key,
                                     headers=original_headers(letter) or None)
    finally:
        await producer.stop()
    return letter
