"""Helpers for integration tests: per-test topics/database/group on the session stack, a worker as a
separate OS process (`python -m ai_worker run`), and polling MongoDB."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pymongo import AsyncMongoClient

from ai_worker.devstack.processes import create_topics
from ai_worker.devstack.stack import StackInfo

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def unique_name(prefix: str) -> str:
    """``prefix_<12 hex>``: valid as a Kafka group id, topic name and MongoDB database name."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@dataclass
class WorkerEnv:
    """Everything one test needs, isolated by name on the shared session stack."""

    info: StackInfo
    tmp: Path
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def database(self) -> str:
        return f"aiw_{self.suffix}"

    @property
    def tasks_topic(self) -> str:
        return f"tasks-{self.suffix}"

    @property
    def progress_topic(self) -> str:
        return f"progress-{self.suffix}"

    @property
    def dlq_topic(self) -> str:
        return f"dlq-{self.suffix}"

    def env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, **self.info.worker_env(group_id=f"group-{self.suffix}")}
        env.update({
            "MONGODB_DATABASE": self.database,
            "KAFKA_TOPIC_TASKS": self.tasks_topic,
            "KAFKA_TOPIC_PROGRESS": self.progress_topic,
            "KAFKA_TOPIC_DLQ": self.dlq_topic,
            "SERVICE_PORT": "0",
            "RECONCILE_INTERVAL_S": "2",
            "PYTHONPATH": str(REPO / "src"),
        })
        env.update(extra)
        return env

    async def create_topics(self) -> None:
        await create_topics(self.info.kafka_bootstrap, [self.tasks_topic, self.progress_topic, self.dlq_topic], 4)

    def start_worker(self, name: str = "w1", **extra: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"worker-{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen([sys.executable, "-m", "ai_worker", "run"],
                                env=self.env(WORKER_ID=f"{name}-{self.suffix}", **extra),
                                stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp)
        self.procs.append(proc)
        return proc

    def log(self, name: str = "w1") -> str:
        return (self.tmp / f"worker-{name}.log").read_text(errors="replace")

    def log_lines(self, name: str = "w1") -> list[dict[str, Any]]:
        out = []
        for line in self.log(name).splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def send_message(self, *args: str) -> str:
        """Run send_message.py; returns the world id it printed."""
        res = subprocess.run(
            [sys.executable, str(REPO / "send_message.py"), *args, "--kafka", self.info.kafka_bootstrap,
             "--mongo", self.info.mongo_uri, "--database", self.database, "--topic", self.tasks_topic],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        for line in res.stdout.splitlines():
            if line.startswith("world_id:"):
                return line.split(":", 1)[1].strip()
        raise AssertionError(f"no world id printed: {res.stdout}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def mongo(info: StackInfo) -> AsyncMongoClient[dict[str, Any]]:
    return AsyncMongoClient(info.mongo_uri, tz_aware=True)


async def wait_world(client: AsyncMongoClient[dict[str, Any]], database: str, world_id: str,
                     timeout_s: float = 90, procs: Sequence[subprocess.Popen[bytes]] = ()) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    doc: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        doc = await client[database]["world_generation_status"].find_one({"_id": world_id})
        if doc and doc.get("status") in ("completed", "failed"):
            return doc
        for proc in procs:
            assert proc.poll() is None, f"worker exited with {proc.returncode}"
        await asyncio.sleep(0.3)
    raise AssertionError(f"world {world_id} not finished in {timeout_s}s: {doc}")


async def produce(bootstrap: str, topic: str, values: Sequence[bytes | None]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value)
    finally:
        await producer.stop()


async def read_topic(bootstrap: str, topic: str, expect: int, timeout_s: float = 30) -> list[Any]:
    """Read at least `expect` messages from every partition of `topic` (no group, assign())."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in parts])
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < expect and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for msgs in batch.values():
                out.extend(msgs)
        return out
    finally:
        await consumer.stop()


async def eventually(check: Callable[[], Awaitable[T]], *, timeout_s: float = 10.0, interval_s: float = 0.02,
                     what: str = "condition") -> T:
    """Poll `check` until it returns a truthy value (which is returned); fail after `timeout_s`. The way to
    wait in these tests: on a condition, never a bare sleep."""
    deadline = time.monotonic() + timeout_s
    last: T = await check()
    while not last:
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached in {timeout_s}s (last: {last!r})")
        await asyncio.sleep(interval_s)
        last = await check()
    return last
