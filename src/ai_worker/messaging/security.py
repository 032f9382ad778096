"""Kafka security settings -> the keyword arguments of every aiokafka client we create.

One function, used for the worker's producer, consumer and admin client, the start-up probe, the DLQ tools
and `ai-worker send`, so a managed Kafka (SASL over TLS) works everywhere at once:

- `KAFKA_SECURITY_PROTOCOL`: PLAINTEXT (default), SSL, SASL_PLAINTEXT, SASL_SSL.
- SASL: `KAFKA_SASL_MECHANISM` (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512), `KAFKA_SASL_USERNAME`,
  `KAFKA_SASL_PASSWORD` (never logged, never in a repr).
- TLS: `KAFKA_SSL_CAFILE` (default: the system's CA certificates), and for mutual TLS `KAFKA_SSL_CERTFILE`,
  `KAFKA_SSL_KEYFILE`, `KAFKA_SSL_KEY_PASSWORD`.

A setting that cannot work (SASL without credentials, credentials without SASL, a CA file that cannot be read)
is a ConfigError naming the variable."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from aiokafka.helpers import create_ssl_context

from ai_worker.config import ConfigError

if TYPE_CHECKING:
    from ai_worker.config import Settings

SSL_PROTOCOLS = ("SSL", "SASL_SSL")
SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")


def kafka_options(settings: Settings) -> dict[str, Any]:
    """aiokafka keyword arguments (`security_protocol`, `ssl_context`, `sasl_*`) for these settings."""
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {"security_protocol": protocol}
    problems: list[str] = []
    files = {"KAFKA_SSL_CAFILE": settings.kafka_ssl_cafile, "KAFKA_SSL_CERTFILE": settings.kafka_ssl_certfile,
             "KAFKA_SSL_KEYFILE": settings.kafka_ssl_keyfile}
    if protocol in SSL_PROTOCOLS:
        if settings.kafka_ssl_keyfile and not settings.kafka_ssl_certfile:
            problems.append("KAFKA_SSL_KEYFILE: set, but KAFKA_SSL_CERTFILE is not")
        else:
            try:
                options["ssl_context"] = create_ssl_context(
                    cafile=settings.kafka_ssl_cafile, certfile=settings.kafka_ssl_certfile,
                    keyfile=settings.kafka_ssl_keyfile,
                    # never None: OpenSSL would prompt on the terminal for the key's password
                    password=settings.kafka_ssl_key_password or "")
            except (OSError, ssl.SSLError, ValueError) as exc:
                named = [name for name, value in files.items() if value]
                problems.append(f"{' / '.join(named) or 'KAFKA_SSL_*'}: cannot be used ({type(exc).__name__}: {exc})")
    else:
        problems.extend(f"{name}: set, but KAFKA_SECURITY_PROTOCOL is {protocol} (use SSL or SASL_SSL)"
                        for name, value in files.items() if value)
    sasl = {"KAFKA_SASL_USERNAME": settings.kafka_sasl_username,
            "KAFKA_SASL_PASSWORD": settings.kafka_sasl_password}
    if protocol in SASL_PROTOCOLS:
        problems.extend(f"{name}: required with KAFKA_SECURITY_PROTOCOL={protocol}"
                        for name, value in sasl.items() if not value)
        options.update(sasl_mechanism=settings.kafka_sasl_mechanism,
                       sasl_plain_username=settings.kafka_sasl_username,
                       sasl_plain_password=settings.kafka_sasl_password)
    else:
        problems.extend(f"{name}: set, but KAFKA_SECURITY_PROTOCOL is {protocol} (use SASL_SSL or SASL_PLAINTEXT)"
                        for name, value in sasl.items() if value)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return options


def describe(options: dict[str, Any]) -> dict[str, Any]:
    """What may be logged about `options`: the protocol and mechanism, never the credentials."""
    out: dict[str, Any] = {"security_protocol": options.get("security_protocol", "PLAINTEXT")}
    if "sasl_mechanism" in options:
        out["sasl_mechanism"] = options["sasl_mechanism"]
        out["sasl_username"] = options.get("sasl_plain_username")
    return out


__all__ = ["SASL_PROTOCOLS", "SSL_PROTOCOLS", "describe", "kafka_options"]
