"""The database command counter (ai_worker.observability.dbstats) that the benches switch on."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from pymongo import monitoring

from ai_worker.observability import dbstats


def _started(command: dict[str, Any], request_id: int) -> monitoring.CommandStartedEvent:
    return monitoring.CommandStartedEvent(command, "db", request_id, ("127.0.0.1", 27017), request_id)


def _succeeded(name: str, request_id: int, micros: int) -> monitoring.CommandSucceededEvent:
    from datetime import timedelta

    return monitoring.CommandSucceededEvent(timedelta(microseconds=micros), {"ok": 1}, name, request_id,
                                            ("127.0.0.1", 27017), request_id, "db")


def _failed(name: str, request_id: int) -> monitoring.CommandFailedEvent:
    from datetime import timedelta

    return monitoring.CommandFailedEvent(timedelta(microseconds=10), {"ok": 0}, name, request_id,
                                         ("127.0.0.1", 27017), request_id, "db")


@pytest.mark.parametrize(("command", "key"), [
    ({"insert": "tasks", "documents": []}, ("insert", "tasks")),
    ({"findAndModify": "tasks", "query": {}}, ("findAndModify", "tasks")),
    ({"getMore": 123, "collection": "tasks"}, ("getMore", "tasks")),
    ({"aggregate": 1, "pipeline": []}, ("aggregate", "-")),
    ({"ping": 1}, ("ping", "-")),
    ({"endSessions": [{}]}, ("endSessions", "-")),
])
def test_command_key(command: dict[str, Any], key: tuple[str, str]) -> None:
    assert dbstats.command_key(next(iter(command)), command) == key


def test_counter_counts_starts_failures_and_time() -> None:
    counter = dbstats.CommandCounter()
    counter.started(_started({"find": "tasks", "filter": {}}, 1))
    counter.started(_started({"find": "tasks", "filter": {}}, 2))
    counter.started(_started({"update": "world_generation_status", "updates": []}, 3))
    counter.succeeded(_succeeded("find", 1, 1500))
    counter.failed(_failed("find", 2))
    counter.succeeded(_succeeded("update", 3, 500))
    counter.succeeded(_succeeded("update", 99, 500))  # never started: ignored
    snap = counter.snapshot()
    assert snap["total"] == 3
    assert snap["failed"] == 1
    rows = {(r["command"], r["collection"]): r for r in snap["commands"]}
    assert rows[("find", "tasks")]["n"] == 2
    assert rows[("find", "tasks")]["failed"] == 1
    assert rows[("find", "tasks")]["ms"] == pytest.approx(1.51)
    assert rows[("update", "world_generation_status")]["ms"] == pytest.approx(0.5)
    assert snap["commands"][0]["command"] == "find"  # most frequent first


def test_counter_is_thread_safe() -> None:
    counter = dbstats.CommandCounter()

    def work(base: int) -> None:
        for i in range(2000):
            counter.started(_started({"insert": "x"}, base + i))
            counter.succeeded(_succeeded("insert", base + i, 1))

    threads = [threading.Thread(target=work, args=(n * 10_000,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = counter.snapshot()
    assert snap["total"] == 8000
    assert snap["commands"][0]["ms"] == pytest.approx(8.0)


def test_nothing_installed_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dbstats.ENV_VAR, raising=False)
    assert dbstats.install_from_env() == []


def test_installed_with_the_variable_and_written(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = tmp_path / "stats.json"
    monkeypatch.setenv(dbstats.ENV_VAR, str(target))
    monkeypatch.setattr(dbstats, "_counter", None)
    monkeypatch.setattr(dbstats.atexit, "register", lambda *a, **k: None)
    monkeypatch.setattr(dbstats.threading.Thread, "start", lambda self: None)  # no writer thread in a test
    listeners = dbstats.install_from_env()
    assert len(listeners) == 1
    assert dbstats.install_from_env() == listeners  # one counter per process
    listeners[0].started(_started({"delete": "tasks"}, 1))
    dbstats.write(target)
    data = json.loads(target.read_text())
    assert data["total"] == 1
    assert data["commands"][0] == {"command": "delete", "collection": "tasks", "n": 1, "failed": 0, "ms": 0.0}
    assert dbstats.snapshot() is not None


async def test_the_worker_client_gets_the_listener(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from ai_worker.app import mongo_client
    from ai_worker.config import load_settings

    settings = load_settings(check=False, MONGODB_URI="mongodb://127.0.0.1:1", KAFKA_BROKERS="127.0.0.1:1")
    monkeypatch.delenv(dbstats.ENV_VAR, raising=False)
    plain = mongo_client(settings)
    assert not plain.options.event_listeners
    await plain.close()
    monkeypatch.setenv(dbstats.ENV_VAR, str(tmp_path / "s.json"))
    monkeypatch.setattr(dbstats, "_counter", None)
    monkeypatch.setattr(dbstats.atexit, "register", lambda *a, **k: None)
    monkeypatch.setattr(dbstats.threading.Thread, "start", lambda self: None)
    counted = mongo_client(settings)
    assert any(isinstance(x, dbstats.CommandCounter) for x in counted.options.event_listeners)
    await counted.close()
