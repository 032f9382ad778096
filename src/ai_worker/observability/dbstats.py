"""Database command counter: how many commands this process sends to MongoDB, by command and collection.

A PyMongo `CommandListener` counts every started command by (command name, collection), plus failures and
the time the server took (from the succeeded/failed events). The collection is the value of the command's
own key when it is a string (`{"insert": "tasks", ...}`, `find`, `update`, `findAndModify`, `aggregate`,
`delete`, `count`, `createIndexes`, ...), `collection` for `getMore`, and "-" for everything else (`ping`,
`hello`, `endSessions`, a database-level `aggregate`...).

It is installed by `app.mongo_client` only when `AI_WORKER_DB_STATS_FILE` is set (the benches set it; see
bench/README.md): the counts are then written as JSON to that file every `WRITE_INTERVAL_S` and at process
exit. Without the variable nothing is installed and nothing costs anything. `snapshot()` returns the same
counts for use inside the process.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pymongo import monitoring

__all__ = ["ENV_VAR", "CommandCounter", "install_from_env", "snapshot", "write"]

ENV_VAR = "AI_WORKER_DB_STATS_FILE"
WRITE_INTERVAL_S = 2.0
NO_COLLECTION = "-"
_PENDING_MAX = 10_000  # started commands whose outcome we still wait for (bounded: events may be lost)


def command_key(command_name: str, command: Mapping[str, Any]) -> tuple[str, str]:
    """(command name, collection) of one command document."""
    target = command.get("collection") if command_name == "getMore" else command.get(command_name)
    return command_name, target if isinstance(target, str) and target else NO_COLLECTION


class CommandCounter(monitoring.CommandListener):
    """Counts started and failed commands and the server time per (command, collection); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started: dict[tuple[str, str], int] = {}
        self._failed: dict[tuple[str, str], int] = {}
        self._micros: dict[tuple[str, str], int] = {}
        self._pending: dict[tuple[Any, int], tuple[str, str]] = {}
        self.since = time.time()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        key = command_key(event.command_name, event.command)
        with self._lock:
            self._started[key] = self._started.get(key, 0) + 1
            if len(self._pending) < _PENDING_MAX:
                self._pending[(event.connection_id, event.request_id)] = key

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        self._finished(event.connection_id, event.request_id, event.duration_micros, failed=False)

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self._finished(event.connection_id, event.request_id, event.duration_micros, failed=True)

    def _finished(self, connection_id: Any, request_id: int, micros: int, *, failed: bool) -> None:
        with self._lock:
            key = self._pending.pop((connection_id, request_id), None)
            if key is None:
                return
            self._micros[key] = self._micros.get(key, 0) + micros
            if failed:
                self._failed[key] = self._failed.get(key, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """The counts so far: `{"pid", "since", "at", "total", "failed", "commands": [{"command",
        "collection", "n", "failed", "ms"}, ...]}`, most frequent first."""
        with self._lock:
            counts = sorted(self._started.items(), key=lambda item: (-item[1], item[0]))
            rows = [
                {"command": cmd, "collection": coll, "n": n, "failed": self._failed.get((cmd, coll), 0),
                 "ms": round(self._micros.get((cmd, coll), 0) / 1000.0, 3)}
                for (cmd, coll), n in counts
            ]
            failed = sum(self._failed.values())
        return {"pid": os.getpid(), "since": self.since, "at": time.time(), "total": sum(n for _, n in counts),
                "failed": failed, "commands": rows}


_counter: CommandCounter | None = None
_install_lock = threading.Lock()


def snapshot() -> dict[str, Any] | None:
    """The process's counts, or None when the counter is not installed."""
    return _counter.snapshot() if _counter is not None else None


def write(path: str | Path) -> None:
    """Write the snapshot as JSON to `path` (atomically: a temporary file, then rename)."""
    data = snapshot()
    if data is None:
        return
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, target)


def _writer(path: str) -> None:
    while True:
        time.sleep(WRITE_INTERVAL_S)
        with contextlib.suppress(OSError):
            write(path)


def install_from_env() -> list[monitoring.CommandListener]:
    """The listeners to give the client: the process's one counter when AI_WORKER_DB_STATS_FILE is set
    (started once, with its writer thread and exit hook), else none."""
    global _counter
    path = os.environ.get(ENV_VAR)
    if not path:
        return []
    with _install_lock:
        if _counter is None:
            _counter = CommandCounter()
            threading.Thread(target=_writer, args=(path,), name="dbstats-writer", daemon=True).start()
            atexit.register(_final_write, path)  # a normal exit, including the end of `ai-worker run`
        return [_counter]


def _final_write(path: str) -> None:
    with contextlib.suppress(OSError):
        write(path)
