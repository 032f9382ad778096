"""`ai-worker run` at start-up: bounded waits, one log line on failure, everything opened is closed (in
reverse order) whatever fails. No servers: the clients are replaced where a server would be needed."""

from __future__ import annotations

import asyncio
import io
import json
import time
from typing import Any
from unittest.mock import MagicMock

import pytest
from aiokafka.errors import KafkaConnectionError

from ai_worker import app as app_module
from ai_worker.app import StartupError, run_worker
from ai_worker.config import Settings, load_settings
from ai_worker.connectivity import Unreachable
from ai_worker.observability.logging import configure_logging


def _settings(**extra: Any) -> Settings:
    base: dict[str, Any] = {"MONGODB_URI": "mongodb://127.0.0.1:1", "KAFKA_BROKERS": "127.0.0.1:1",
                            "OPENROUTER_API_KEY": "sk-test", "RUNWARE_API_KEY": "rw-test", "STARTUP_TIMEOUT_S": 1,
                            "SERVICE_PORT": 0}
    base.update(extra)
    return load_settings(**base)


def _lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]


async def test_mongodb_unreachable_logs_one_line_and_raises() -> None:
    out = io.StringIO()
    configure_logging("INFO", stream=out)
    t0 = time.monotonic()
    with pytest.raises(StartupError) as info:
        await run_worker(_settings(MONGODB_URI="mongodb://user:hunter2@127.0.0.1:1/?authSource=admin"))
    assert info.value.exit_code == 1
    assert time.monotonic() - t0 < 4
    failed = [line for line in _lines(out) if line["event"] == "startup failed"]
    assert len(failed) == 1, out.getvalue()
    assert failed[0]["what"] == "MongoDB" and failed[0]["level"] == "error"
    assert failed[0]["address"] == "mongodb://user:***@127.0.0.1:1/?authSource=admin"
    assert "hunter2" not in out.getvalue()
    assert "Traceback" not in out.getvalue()


async def test_stop_while_waiting_returns_cleanly() -> None:
    configure_logging("INFO", stream=io.StringIO())
    stop = asyncio.Event()
    stop.set()
    await asyncio.wait_for(run_worker(_settings(STARTUP_TIMEOUT_S=30), stop), 5)


class _Recorder:
    def __init__(self) -> None:
        self.closed: list[str] = []


@pytest.fixture
def fake_servers(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    """MongoDB answers (a fake client), Kafka is reachable for the probe; what fails is set per test."""
    rec = _Recorder()

    class FakeMongo:
        def __getitem__(self, name: str) -> Any:
            return MagicMock()

        async def close(self) -> None:
            rec.closed.append("mongodb")

    async def nothing(*_: Any, **__: Any) -> None:
        return None

    monkeypatch.setattr(app_module, "mongo_client", lambda settings: FakeMongo())
    monkeypatch.setattr(app_module, "wait_for_mongo", nothing)
    monkeypatch.setattr(app_module, "wait_for_kafka", nothing)
    monkeypatch.setattr(app_module, "ensure_topics", nothing)
    monkeypatch.setattr(app_module, "apply_retention", nothing)
    for owner in (app_module.TaskStore, app_module.WorldStatusStore, app_module.MongoRecorder):
        monkeypatch.setattr(owner, "ensure_indexes", nothing)

    async def producer_stop(self: Any) -> None:
        rec.closed.append("producer")

    async def consumer_stop(self: Any) -> None:
        rec.closed.append("consumer")

    async def platform_close(self: Any) -> None:
        rec.closed.append("platform")

    monkeypatch.setattr(app_module.EventProducer, "stop", producer_stop)
    monkeypatch.setattr(app_module.TaskConsumer, "stop", consumer_stop)
    monkeypatch.setattr(app_module.PlatformClients, "close", platform_close)
    return rec


async def test_a_failed_producer_closes_what_was_opened(fake_servers: _Recorder,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse(self: Any) -> None:
        raise KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 1)]")

    monkeypatch.setattr(app_module.EventProducer, "start", refuse)
    out = io.StringIO()
    configure_logging("INFO", stream=out)
    with pytest.raises(StartupError):
        await run_worker(_settings())
    assert fake_servers.closed == ["producer", "mongodb"]
    failed = [line for line in _lines(out) if line["event"] == "startup failed"]
    assert len(failed) == 1 and failed[0]["what"] == "Kafka (producer)"
    assert failed[0]["address"] == "127.0.0.1:1"


async def test_a_failed_consumer_closes_everything_in_reverse_order(fake_servers: _Recorder,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    async def ok(self: Any) -> None:
        return None

    async def hang(self: Any) -> None:
        await asyncio.sleep(3600)

    monkeypatch.setattr(app_module.EventProducer, "start", ok)
    monkeypatch.setattr(app_module.TaskConsumer, "start", hang)  # a start that never returns is bounded too
    configure_logging("INFO", stream=io.StringIO())
    t0 = time.monotonic()
    with pytest.raises(StartupError):
        await run_worker(_settings())
    assert time.monotonic() - t0 < 5
    assert fake_servers.closed == ["consumer", "platform", "producer", "mongodb"]


def test_unreachable_line_names_address_and_what_to_check() -> None:
    exc = Unreachable("Kafka", "k1:9092,k2:9092", KafkaConnectionError("Unable to bootstrap from [...]"), "check X")
    assert str(exc) == "Kafka at k1:9092,k2:9092 not usable (KafkaConnectionError: no bootstrap server could be " \
                       "connected to); check X"
    assert exc.exit_code == 1


def test_library_log_records_are_json_lines_too() -> None:
    """aiokafka and pymongo log through the stdlib: their lines (tracebacks included) must not break the JSON
    stream."""
    import logging

    out = io.StringIO()
    configure_logging("INFO", stream=out)
    logging.getLogger("aiokafka").error('Unable connect to "%s:%s": %s', "127.0.0.1", 1, "refused")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("pymongo").warning("with a traceback", exc_info=True)
    logging.getLogger("aiokafka").info("below WARNING: dropped")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]  # every line is JSON
    assert [(line["logger"], line["level"], line["event"]) for line in lines] == [
        ("aiokafka", "error", 'Unable connect to "127.0.0.1:1": refused'),
        ("pymongo", "warning", "with a traceback")]
    assert "ValueError: boom" in lines[1]["exception"] and "timestamp" in lines[0]
