"""Topic creation: the worker creates its topics when they are missing (and again after a broker
restart that lost them)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

log = structlog.get_logger(__name__)


async def ensure_topics(bootstrap: Sequence[str], topics: Sequence[str], partitions: int,
                        options: Mapping[str, Any] | None = None) -> list[str]:
    """Create the topics that do not exist yet; returns the ones created. `options`: security keyword
    arguments (messaging.security.kafka_options)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=list(bootstrap), request_timeout_ms=15000, **dict(options or {}))
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if not missing:
            return []
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([NewTopic(t, num_partitions=partitions, replication_factor=1) for t in missing])
        log.info("topics created", topics=missing, partitions=partitions)
        return missing
    finally:
        await admin.close()
