"""Kafka security settings reach every aiokafka client (inspected on the client objects, no broker needed),
and are never shown: not in the settings' repr, not in a log line."""

from __future__ import annotations

import io
import ssl
from pathlib import Path
from typing import Any

import certifi
import pytest
import structlog

from ai_worker import client as client_module
from ai_worker.config import ConfigError, Settings, load_settings
from ai_worker.messaging import admin as admin_module
from ai_worker.messaging import dlq as dlq_module
from ai_worker.messaging.consumer import TaskConsumer
from ai_worker.messaging.producer import EventProducer
from ai_worker.messaging.security import describe, kafka_options
from ai_worker.observability.logging import configure_logging

SECRET = "s3cr3t-pa55"


def _settings(**env: Any) -> Settings:
    return load_settings(check=False, MONGODB_URI="mongodb://db", KAFKA_BROKERS="k1:9093,k2:9093", **env)


@pytest.fixture
def sasl_ssl() -> Settings:
    return _settings(KAFKA_SECURITY_PROTOCOL="SASL_SSL", KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
                     KAFKA_SASL_USERNAME="worker", KAFKA_SASL_PASSWORD=SECRET, KAFKA_SSL_CAFILE=certifi.where())


def test_plaintext_by_default() -> None:
    assert kafka_options(_settings()) == {"security_protocol": "PLAINTEXT"}


def test_sasl_ssl_options(sasl_ssl: Settings) -> None:
    opts = kafka_options(sasl_ssl)
    assert opts["security_protocol"] == "SASL_SSL"
    assert opts["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (opts["sasl_plain_username"], opts["sasl_plain_password"]) == ("worker", SECRET)
    assert isinstance(opts["ssl_context"], ssl.SSLContext)
    assert opts["ssl_context"].verify_mode == ssl.CERT_REQUIRED


def test_ssl_without_cafile_uses_the_system_cas() -> None:
    opts = kafka_options(_settings(KAFKA_SECURITY_PROTOCOL="SSL"))
    assert isinstance(opts["ssl_context"], ssl.SSLContext) and "sasl_mechanism" not in opts


@pytest.mark.parametrize(("env", "named"), [
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "KAFKA_SASL_USERNAME"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_USERNAME": "u"}, "KAFKA_SASL_PASSWORD"),
    ({"KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p"}, "KAFKA_SASL_USERNAME: set, but"),
    ({"KAFKA_SSL_CAFILE": "/ca.pem"}, "KAFKA_SSL_CAFILE: set, but"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"}, "KAFKA_SSL_CAFILE"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_KEYFILE": "/k.pem"}, "KAFKA_SSL_CERTFILE is not"),
])
def test_unusable_settings_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        kafka_options(_settings(**env))
    assert named in str(info.value)


def test_invalid_protocol_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        _settings(KAFKA_SECURITY_PROTOCOL="TLS")
    assert "KAFKA_SECURITY_PROTOCOL" in str(info.value)


def test_load_settings_checks_them(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(MONGODB_URI="mongodb://db", KAFKA_BROKERS="k:9092", OPENROUTER_API_KEY="sk",
                      KAFKA_SECURITY_PROTOCOL="SASL_SSL")
    assert "KAFKA_SASL_USERNAME" in str(info.value)


def _client_settings(kafka_client: Any) -> tuple[str, str | None, str | None, str | None, Any]:
    return (kafka_client._security_protocol, kafka_client._sasl_mechanism, kafka_client._sasl_plain_username,
            kafka_client._sasl_plain_password, kafka_client._ssl_context)


async def test_they_reach_the_producer_and_the_consumer(sasl_ssl: Settings) -> None:
    opts = sasl_ssl.kafka_options
    producer = EventProducer(bootstrap=sasl_ssl.kafka_bootstrap, tasks_topic="t", progress_topic="p",
                             dlq_topic="d", client_options=opts)

    async def handler(_: Any) -> None:
        return None

    consumer = TaskConsumer(bootstrap=sasl_ssl.kafka_bootstrap, topic="t", group_id="g", handler=handler,
                            producer=producer, max_in_flight=1, drain_timeout_s=1, client_options=opts)
    try:
        expected = ("SASL_SSL", "SCRAM-SHA-512", "worker", SECRET, opts["ssl_context"])
        assert _client_settings(producer._producer.client) == expected
        assert _client_settings(consumer._consumer._client) == expected
    finally:
        await consumer.stop()
        await producer.stop()


class _Refused(Exception):
    pass


async def test_they_reach_the_admin_client_dlq_tools_and_send(sasl_ssl: Settings,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def recorder(name: str) -> Any:
        class Fake:
            def __init__(self, **kwargs: Any) -> None:
                seen.append((name, kwargs))

            async def start(self) -> None:
                raise _Refused

            async def stop(self) -> None:
                return None

            async def close(self) -> None:
                return None
        return Fake

    monkeypatch.setattr(admin_module, "AIOKafkaAdminClient", recorder("admin"))
    monkeypatch.setattr(dlq_module, "AIOKafkaConsumer", recorder("dlq consumer"))
    monkeypatch.setattr(client_module, "AIOKafkaProducer", recorder("send producer"))
    opts = sasl_ssl.kafka_options
    with pytest.raises(_Refused):
        await admin_module.ensure_topics(sasl_ssl.kafka_bootstrap, ["t"], 1, opts)
    with pytest.raises(_Refused):
        await dlq_module.read_dead_letters(sasl_ssl.kafka_bootstrap, "d", None, 1, options=opts)
    with pytest.raises(_Refused):  # send reaches Kafka first: MongoDB (unreachable here) is not even tried
        await client_module.send_world(kafka="k1:9093", mongo_uri="mongodb://127.0.0.1:1", database="x",
                                       topic="t", prompt="p", users=1, posts=0, kafka_options=opts)
    assert [name for name, _ in seen] == ["admin", "dlq consumer", "send producer"]
    for name, kwargs in seen:
        for key in ("security_protocol", "sasl_mechanism", "sasl_plain_username", "sasl_plain_password",
                    "ssl_context"):
            assert kwargs[key] == opts[key], (name, key)


def test_secrets_are_never_shown(sasl_ssl: Settings, tmp_path: Path) -> None:
    assert SECRET not in repr(sasl_ssl)
    assert SECRET not in str(describe(sasl_ssl.kafka_options))
    out = io.StringIO()
    configure_logging("DEBUG", stream=out)
    structlog.get_logger("t").info("kafka security", **describe(sasl_ssl.kafka_options),
                                   kafka_sasl_password=SECRET)
    assert "SCRAM-SHA-512" in out.getvalue() and SECRET not in out.getvalue()
