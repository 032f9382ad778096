"""Fixtures of the console tests: a fresh database on the session stack and the console app on it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pymongo import AsyncMongoClient
from support import unique_name

from ai_worker.console.app import ConsoleConfig, create_app
from ai_worker.devstack.stack import StackInfo
from ai_worker.mongo import Database

MakeConsole = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def console_db(stack_info: StackInfo) -> AsyncIterator[Database]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stack_info.mongo_uri, tz_aware=True)
    try:
        yield client[unique_name("console")]
    finally:
        await client.close()


@pytest.fixture
async def make_console(console_db: Database) -> AsyncIterator[MakeConsole]:
    """`await make_console(token=..., kafka=(...), ...)`: a started test client of the console on console_db."""
    clients: list[TestClient[Any, Any]] = []

    async def make(**config: Any) -> TestClient[Any, Any]:
        settings = {"mongo_uri": "mongodb://console:hunter2@db.invalid:27017", "database": console_db.name,
                    **config}
        client: TestClient[Any, Any] = TestClient(TestServer(create_app(ConsoleConfig(**settings), db=console_db)))
        await client.start_server()
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for client in clients:
            await client.close()
