"""The worker's readiness checks (GET /ready): MongoDB, Kafka, the consumer, shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, Final

from ai_worker.config import Settings
from ai_worker.messaging.consumer import TaskConsumer
from ai_worker.messaging.producer import EventProducer
from ai_worker.mongo import Database
from ai_worker.observability.readiness import NotReady, Probe, Readiness

MONGO_TIMEOUT_S: Final = 1.0
KAFKA_TIMEOUT_S: Final = 1.5
POLL_STALE_MIN_S: Final = 30.0


def poll_stale_after(settings: Settings) -> float:
    """How long without a poll means the consumer loop is stuck: 30 s, or longer when a rebalance may wait
    for in-flight tasks longer than that (SHUTDOWN_GRACE_S)."""
    return max(POLL_STALE_MIN_S, settings.shutdown_grace_s + 10.0)


def worker_readiness(settings: Settings, db: Database, producer: EventProducer, consumer: TaskConsumer,
                     stop: asyncio.Event) -> Readiness:
    stale_s = poll_stale_after(settings)

    async def mongodb() -> None:
        await db.command("ping")

    async def kafka() -> None:
        await producer.check_connection()

    async def consumer_polling() -> Mapping[str, Any]:
        partitions = len(consumer.assignment())
        last = consumer.last_poll  # time.monotonic() of the last poll; 0 (or None) before the first
        if not last:
            raise NotReady("the poll loop has not polled yet")
        age = round(time.monotonic() - last, 1)
        if age > stale_s:
            raise NotReady(f"the poll loop has not polled for {age:g} s (limit {stale_s:g} s)")
        if partitions == 0:
            raise NotReady("no partitions assigned (joining the group, or more workers than partitions)")
        return {"partitions": partitions, "last_poll_s_ago": age}

    async def worker() -> None:
        if stop.is_set():
            raise NotReady("shutting down")

    return Readiness({
        "mongodb": Probe(mongodb, MONGO_TIMEOUT_S),
        "kafka": Probe(kafka, KAFKA_TIMEOUT_S),
        "consumer": Probe(consumer_polling, 1.0),
        "worker": Probe(worker, 1.0),
    })
