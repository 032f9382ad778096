"""What every CLI command shares: its connection options (one place for their defaults), bounded connections,
failures as one line, and the exit codes: 0 ok, 1 operational failure, 2 usage or configuration error.

A command declares the options it needs with the `Annotated` aliases below, turns them into a `Conn` with
`resolve()` (option > environment > default, through `Settings`, so KAFKA_SECURITY_PROTOCOL and the other
settings apply too), and runs its coroutine with `run()`:

    def cmd(mongo: MongoOpt = None, database: DatabaseOpt = None, timeout: TimeoutOpt = None,
            debug: DebugOpt = False) -> None:
        conn = resolve(mongo=mongo, database=database, timeout=timeout, debug=debug)

        async def go() -> int:
            async with mongo_db(conn) as db:
                ...
            return 0

        run(conn, go, doing="cmd")
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn

import typer
from pymongo.errors import PyMongoError
from rich.console import Console
from rich.markup import escape

from ai_worker.config import ConfigError, Settings, load_settings
from ai_worker.connectivity import (
    KAFKA_ERRORS,
    KAFKA_HINT,
    Unreachable,
    check_mongo,
    kafka_address,
    mask_uri,
    mongo_client,
    mongo_error,
)
from ai_worker.mongo import Database

DEFAULT_MONGO = "mongodb://localhost:27017"
DEFAULT_KAFKA = "localhost:9092"

err_console = Console(stderr=True, soft_wrap=True, highlight=False)

MongoOpt = Annotated[str | None, typer.Option(
    "--mongo", help="MongoDB URI (default: MONGODB_URI or mongodb://localhost:27017)", show_default=False)]
DatabaseOpt = Annotated[str | None, typer.Option(
    "--database", help="MongoDB database (default: MONGODB_DATABASE or generia_ai_worker)", show_default=False)]
KafkaOpt = Annotated[str | None, typer.Option(
    "--kafka", help="HOST:PORT[,HOST:PORT] (default: KAFKA_BROKERS or localhost:9092)", show_default=False)]
TopicOpt = Annotated[str | None, typer.Option(
    "--topic", help="Tasks topic (default: KAFKA_TOPIC_TASKS or generia-tasks)", show_default=False)]
DlqTopicOpt = Annotated[str | None, typer.Option(
    "--dlq-topic", help="Dead-letter topic (default: KAFKA_TOPIC_DLQ or generia-tasks-dlq)", show_default=False)]
TimeoutOpt = Annotated[float | None, typer.Option(
    "--timeout", min=0.1, help="Seconds to reach MongoDB / Kafka before giving up (default: CLI_TIMEOUT_S or 5)",
    show_default=False)]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the traceback of a failure")]


class _Global:
    debug = False  # set by the app's `--debug` option (before the command name)


GLOBAL = _Global()


@dataclass(frozen=True)
class Conn:
    """Where a command connects and how long it may try."""

    settings: Settings
    timeout_s: float
    debug: bool

    @property
    def mongo_uri(self) -> str:
        return self.settings.mongodb_uri

    @property
    def mongo_address(self) -> str:
        return mask_uri(self.settings.mongodb_uri)

    @property
    def database(self) -> str:
        return self.settings.mongodb_database

    @property
    def kafka(self) -> list[str]:
        return self.settings.kafka_bootstrap

    @property
    def kafka_address(self) -> str:
        return kafka_address(self.settings.kafka_bootstrap)

    @property
    def kafka_options(self) -> dict[str, Any]:
        return self.settings.kafka_options

    @property
    def topic(self) -> str:
        return self.settings.kafka_topic_tasks

    @property
    def dlq_topic(self) -> str:
        return self.settings.kafka_topic_dlq


def resolve(*, mongo: str | None = None, database: str | None = None, kafka: str | None = None,
            topic: str | None = None, dlq_topic: str | None = None, timeout: float | None = None,
            debug: bool = False) -> Conn:
    """Options win over the environment, the environment over the defaults. A configuration that cannot
    work (an invalid variable, SASL without a password, ...) ends the command with exit code 2."""
    overrides: dict[str, object] = {
        "MONGODB_URI": mongo or os.environ.get("MONGODB_URI") or DEFAULT_MONGO,
        "KAFKA_BROKERS": kafka or os.environ.get("KAFKA_BROKERS") or DEFAULT_KAFKA,
    }
    for name, value in (("MONGODB_DATABASE", database), ("KAFKA_TOPIC_TASKS", topic),
                        ("KAFKA_TOPIC_DLQ", dlq_topic), ("CLI_TIMEOUT_S", timeout)):
        if value is not None:
            overrides[name] = value
    debug = debug or GLOBAL.debug
    try:
        settings = load_settings(check=False, **overrides)
        _ = settings.kafka_options  # SASL / SSL settings that cannot work: say so now
    except ConfigError as exc:
        fail(f"configuration error: {exc}", 2)
    if not settings.kafka_bootstrap:
        fail("configuration error: no Kafka address (--kafka / KAFKA_BROKERS)", 2)
    return Conn(settings=settings, timeout_s=settings.cli_timeout_s, debug=debug)


def fail(message: str, code: int) -> NoReturn:
    """One line on stderr, then exit with `code`."""
    err_console.print(f"[bold red]error[/]: {escape(message)}")
    raise typer.Exit(code)


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning[/]: {escape(message)}")


@contextlib.asynccontextmanager
async def mongo_db(conn: Conn) -> AsyncIterator[Database]:
    """The command's database, after a ping bounded by the timeout; the client is closed in every case."""
    client = mongo_client(conn.mongo_uri, timeout_s=conn.timeout_s)
    try:
        await check_mongo(client, conn.mongo_uri, conn.timeout_s)
        yield client[conn.database]
    finally:
        await client.close()


def run(conn: Conn, main: Callable[[], Awaitable[int | None]], *, doing: str) -> NoReturn:
    """Run the command's coroutine; any failure becomes one line naming what failed and what to check (with
    the traceback before it when --debug), and the exit code 1 (2 for a configuration error)."""
    _library_logs(conn.debug)
    try:
        code = asyncio.run(_call(main))
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        if conn.debug:
            traceback.print_exception(exc)
        message, code = describe_failure(conn, exc, doing)
        fail(message, code)
    raise typer.Exit(code or 0)


async def _call(main: Callable[[], Awaitable[int | None]]) -> int | None:
    return await main()


def describe_failure(conn: Conn, exc: BaseException, doing: str) -> tuple[str, int]:
    """(the line, the exit code) for a failure of a command."""
    if isinstance(exc, Unreachable):
        return str(exc), exc.exit_code
    if isinstance(exc, ConfigError):
        return f"configuration error: {exc}", 2
    if isinstance(exc, PyMongoError):
        return str(mongo_error(conn.mongo_uri, exc)), 1
    if isinstance(exc, KAFKA_ERRORS):
        return str(Unreachable("Kafka", conn.kafka_address, exc, KAFKA_HINT)), 1
    return f"{doing} failed: {type(exc).__name__}: {exc}", 1


def _library_logs(debug: bool) -> None:
    """Libraries log what the command reports itself (aiokafka: every refused connection, at ERROR; asyncio:
    clean-up noise): without --debug they stay quiet; with it, their warnings go to stderr."""
    if debug:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return
    for name in ("aiokafka", "kafka", "asyncio", "pymongo"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


__all__ = ["GLOBAL", "Conn", "DatabaseOpt", "DebugOpt", "DlqTopicOpt", "KafkaOpt", "MongoOpt", "TimeoutOpt",
           "TopicOpt", "describe_failure", "fail", "mongo_db", "resolve", "run", "warn"]
