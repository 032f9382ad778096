"""Kafka producer for follow-on task events, progress events and dead letters."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer

from ai_worker.messaging.events import task_created
from ai_worker.observability import tracing

log = structlog.get_logger(__name__)


class EventProducer:
    def __init__(
        self,
        *,
        bootstrap: Sequence[str],
        tasks_topic: str,
        progress_topic: str,
        dlq_topic: str,
        enable_idempotence: bool = False,
        client_id: str = "ai-worker",
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        """`client_options`: security keyword arguments for aiokafka (messaging.security.kafka_options)."""
        self.tasks_topic = tasks_topic
        self.progress_topic = progress_topic
        self.dlq_topic = dlq_topic
        self._producer = AIOKafkaProducer(
            bootstrap_servers=list(bootstrap),
            client_id=client_id,
            acks="all",
            enable_idempotence=enable_idempotence,
            linger_ms=5,
            request_timeout_ms=30000,
            max_request_size=2 * 1024 * 1024,
            **dict(client_options or {}),
        )

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def check_connection(self) -> None:
        """One metadata round trip with the cluster over the producer's connections (readiness); raises
        ConnectionError when no broker answered. Bound it with a timeout."""
        if not await self._producer.client.force_metadata_update():
            raise ConnectionError("no broker answered a metadata request")

    async def publish_task(self, task_id: str, task_type: str, world_id: str) -> None:
        # Keyed by task id so follow-on events spread over partitions.
        event = task_created(task_id, task_type, world_id)
        await self._producer.send_and_wait(self.tasks_topic, event.to_bytes(), key=task_id.encode(),
                                           headers=tracing.task_headers(task_id))

    async def publish_progress(self, event: dict[str, Any]) -> None:
        body = {**event, "timestamp": datetime.now(UTC).isoformat()}
        key = str(event.get("world_id") or "").encode() or None
        await self._producer.send_and_wait(self.progress_topic, json.dumps(body).encode(), key=key)

    async def send_dead_letter(
        self,
        *,
        value: bytes | None,
        key: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        reason: str,
        source_topic: str,
        partition: int,
        offset: int,
    ) -> None:
        dlq_headers = [
            *headers,
            ("x-dlq-reason", reason.encode()[:1000]),
            ("x-dlq-source-topic", source_topic.encode()),
            ("x-dlq-source-partition", str(partition).encode()),
            ("x-dlq-source-offset", str(offset).encode()),
            ("x-dlq-time", datetime.now(UTC).isoformat().encode()),
        ]
        await self._producer.send_and_wait(self.dlq_topic, value, key=key, headers=dlq_headers)
