"""In-memory stand-ins shared by unit and integration tests."""

from __future__ import annotations

from ai_worker.providers.history import ApiRequestRecord


class MemoryRecorder:
    """Keeps every request-history record in a list."""

    def __init__(self) -> None:
        self.records: list[ApiRequestRecord] = []

    async def record(self, record: ApiRequestRecord) -> None:
        self.records.append(record)
