"""Every CLI command against an address that cannot be used: bounded time, one line naming the address and
what to check, exit code 1 (2 for a configuration mistake), no traceback. No stack needed: nothing listens
at 127.0.0.1:1, and a "silent" server is a socket that accepts connections and never answers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from support import REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DOWN_MONGO = "mongodb://worker:hunter2@127.0.0.1:1/?authSource=admin"
DOWN_KAFKA = "127.0.0.1:1"
CLEARED = ("MONGODB_URI", "MONGODB_DATABASE", "KAFKA_BROKERS", "KAFKA_TOPIC_TASKS", "KAFKA_TOPIC_DLQ",
           "CLI_TIMEOUT_S", "KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD", "LOG_LEVEL")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.upper() not in CLEARED}
    env["PYTHONPATH"] = str(REPO / "src")
    env.update(extra)
    return env


def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "ai_worker", *args], capture_output=True, text=True, timeout=60,
                         env=env or _env(), check=False)
    return res, time.monotonic() - t0


def _one_line(res: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"stderr: {res.stderr!r}"
    assert not res.stdout.strip(), f"stdout: {res.stdout!r}"
    assert "Traceback" not in res.stderr
    return lines[0]


MONGO_COMMANDS = [
    ["status", "some-world"],
    ["status", "some-world", "--watch"],
    ["cancel", "some-world"],
    ["retry", "some-world"],
    ["worlds"],
    ["tasks", "some-world"],
    ["models", "stats"],
    ["platform", "--grpc-port", "0", "--http-port", "0"],
]
KAFKA_COMMANDS = [
    ["send"],
    ["dlq", "list"],
    ["dlq", "replay"],
]


@pytest.mark.parametrize("args", MONGO_COMMANDS + KAFKA_COMMANDS, ids=" ".join)
def test_unreachable_address_one_line_exit_1(args: list[str]) -> None:
    res, elapsed = _cli(*args, "--mongo" if args[0] not in ("dlq",) else "--kafka",
                        DOWN_MONGO if args[0] not in ("dlq",) else DOWN_KAFKA,
                        *(["--kafka", DOWN_KAFKA] if args[0] == "send" else []))
    assert res.returncode == 1, res.stderr
    assert elapsed < 6
    line = _one_line(res)
    if args in KAFKA_COMMANDS:  # send talks to Kafka first: the line names the Kafka address given
        assert f"Kafka at {DOWN_KAFKA}" in line and "KAFKA_BROKERS" in line
    else:
        assert "MongoDB at mongodb://worker:***@127.0.0.1:1/?authSource=admin" in line and "MONGODB_URI" in line
    assert "hunter2" not in res.stderr


def test_run_with_mongodb_unreachable_logs_one_line_and_exits_1() -> None:
    res, elapsed = _cli("run", env=_env(MONGODB_URI=DOWN_MONGO, KAFKA_BROKERS=DOWN_KAFKA, STARTUP_TIMEOUT_S="1",
                                        OPENROUTER_API_KEY="sk-test", RUNWARE_API_KEY="rw-test", SERVICE_PORT="0"))
    assert res.returncode == 1
    assert elapsed < 6
    assert "Traceback" not in res.stdout + res.stderr and "hunter2" not in res.stdout + res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]  # every line is JSON
    errors = [line for line in lines if line["level"] == "error"]
    assert len(errors) == 1 and errors[0]["event"] == "startup failed"
    assert errors[0]["what"] == "MongoDB" and errors[0]["address"].startswith("mongodb://worker:***@")


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel completes the handshake) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


@pytest.mark.parametrize("args", [["status", "w"], ["send"], ["dlq", "list"]], ids=" ".join)
def test_silent_server_gives_up_after_the_timeout(args: list[str], silent_port: int) -> None:
    address = ["--mongo", f"mongodb://127.0.0.1:{silent_port}"] if args[0] == "status" \
        else ["--kafka", f"127.0.0.1:{silent_port}"]
    res, elapsed = _cli(*args, *address, "--timeout", "2")
    assert res.returncode == 1
    assert 2 <= elapsed < 5.5
    assert "no answer within 2 s" in _one_line(res)


def test_timeout_comes_from_the_environment_too(silent_port: int) -> None:
    res, elapsed = _cli("status", "w", env=_env(MONGODB_URI=f"mongodb://127.0.0.1:{silent_port}", CLI_TIMEOUT_S="1"))
    assert res.returncode == 1 and elapsed < 4.5
    assert "no answer within 1 s" in _one_line(res)


@pytest.mark.parametrize(("args", "env", "expected"), [
    (["status", "w", "--mongo", "mongodb://u:p@[broken"], {}, "fix the URI"),
    (["dlq", "list"], {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "KAFKA_SASL_USERNAME"),
    (["status", "w"], {"CLI_TIMEOUT_S": "soon"}, "CLI_TIMEOUT_S"),
], ids=["bad uri", "sasl without user", "bad timeout"])
def test_configuration_errors_exit_2(args: list[str], env: dict[str, str], expected: str) -> None:
    res, _ = _cli(*args, env=_env(**env))
    assert res.returncode == 2
    assert expected in res.stderr and "Traceback" not in res.stderr


def test_usage_error_exits_2() -> None:
    res, _ = _cli("status")  # missing WORLD_ID
    assert res.returncode == 2


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(where: str) -> None:
    args = ["status", "w", "--mongo", "mongodb://127.0.0.1:1"]
    res, _ = _cli(*(["--debug", *args] if where == "before" else [*args, "--debug"]))
    assert res.returncode == 1
    assert "Traceback" in res.stderr and "MongoDB at mongodb://127.0.0.1:1" in res.stderr
