"""Reaching MongoDB and Kafka within a bound, and saying clearly which address failed.

Used by `ai-worker run` at start-up (wait up to STARTUP_TIMEOUT_S for the servers, then one log line and
exit 1) and by every CLI command (a few seconds, then one line on stderr and exit 1). Addresses are shown
with any password masked; errors carry what to check."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Final

from aiokafka.errors import KafkaConnectionError, KafkaError
from pymongo import AsyncMongoClient
from pymongo.errors import ConfigurationError, OperationFailure, PyMongoError

from ai_worker.mongo import Client

MONGO_HINT: Final = "check that MongoDB runs there and accepts connections, and the URI (MONGODB_URI / --mongo)"
MONGO_AUTH_HINT: Final = "check the user, password and authSource in the URI (MONGODB_URI / --mongo)"
MONGO_URI_HINT: Final = "fix the URI (MONGODB_URI / --mongo)"
KAFKA_HINT: Final = ("check that a broker runs there, the address (KAFKA_BROKERS / --kafka) and the security "
                     "settings (KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_*, KAFKA_SSL_*)")
AUTH_FAILED: Final = 18  # MongoDB's AuthenticationFailed
ATTEMPT_S: Final = 3.0  # one attempt of a start-up wait (MongoDB ping, Kafka bootstrap)

# Errors that mean "the broker could not be reached or refused us", as opposed to a bug of ours.
KAFKA_ERRORS: Final = (KafkaError, OSError, TimeoutError)

_USERINFO = re.compile(r"^(?P<scheme>[a-z0-9+.-]+://)(?P<user>[^:@/]*):(?P<password>[^@/]*)@", re.IGNORECASE)
_SECRET_PARAM = re.compile(r"(?P<key>[?&;][^=&;]*(?:password|secret|token)[^=&;]*=)(?P<value>[^&;]*)", re.IGNORECASE)


class Unreachable(Exception):
    """A server could not be reached (or refused us) within the bound. `str()` is the line an operator reads:
    the service, its address (password masked), what went wrong, and what to check."""

    def __init__(self, service: str, address: str, error: BaseException | str, hint: str, *,
                 usage: bool = False) -> None:
        self.service = service
        self.address = address
        if isinstance(error, str):  # "ErrorType" or "ErrorType: detail"
            self.error_type, _, detail = error.partition(": ")
            self.detail = short_error(detail) if detail else self.error_type
        else:
            self.error_type, self.detail = type(error).__name__, short_error(error)
        self.hint = hint
        self.usage = usage  # a configuration mistake (exit 2), not an outage (exit 1)
        super().__init__(str(self))

    @property
    def exit_code(self) -> int:
        return 2 if self.usage else 1

    def __str__(self) -> str:
        detail = f": {self.detail}" if self.detail and self.detail != self.error_type else ""
        return f"{self.service} at {self.address} not usable ({self.error_type}{detail}); {self.hint}"

    def log_fields(self) -> dict[str, str]:
        """The fields of the one structured line `run` logs."""
        return {"what": self.service, "address": self.address, "error_type": self.error_type, "error": self.detail,
                "hint": self.hint}


def short_error(error: BaseException | str) -> str:
    """One readable line of an error: pymongo's topology descriptions and aiokafka's host lists cut off."""
    if isinstance(error, KafkaConnectionError) and "bootstrap" in str(error):
        return "no bootstrap server could be connected to"
    text = error if isinstance(error, str) else str(error) or type(error).__name__
    if not isinstance(error, str):
        text = text.removeprefix(f"{type(error).__name__}: ")
    text = text.strip().splitlines()[0] if text.strip() else text
    for cut in (", Timeout:", " (configured timeouts"):
        text = text.split(cut, 1)[0]
    return text[:300]


def mask_uri(uri: str) -> str:
    """`mongodb://user:secret@host/?tlsCertificateKeyFilePassword=x` -> `mongodb://user:***@host/?...=***`."""
    masked = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", uri)
    return _SECRET_PARAM.sub(lambda m: f"{m['key']}***", masked)


def kafka_address(bootstrap: Sequence[str] | str) -> str:
    return bootstrap if isinstance(bootstrap, str) else ",".join(bootstrap)


# --- MongoDB -------------------------------------------------------------------------------------------------
def mongo_client(uri: str, *, timeout_s: float, server_selection_s: float | None = None) -> Client:
    """A client whose server selection and connection attempts give up after `timeout_s` (server selection:
    `server_selection_s` when given). An invalid URI raises Unreachable(usage=True)."""
    selection_ms = int(1000 * (server_selection_s if server_selection_s is not None else timeout_s))
    try:
        client: Client = AsyncMongoClient(uri, tz_aware=True, serverSelectionTimeoutMS=max(selection_ms, 1),
                                          connectTimeoutMS=max(int(1000 * timeout_s), 1))
    except (ConfigurationError, ValueError, TypeError) as exc:
        raise Unreachable("MongoDB", mask_uri(uri), exc, MONGO_URI_HINT, usage=True) from None
    return client


def mongo_error(uri: str, exc: BaseException, client: Client | None = None,
                timeout_s: float | None = None) -> Unreachable:
    """The operator's view of a failed MongoDB operation. A bare timeout (ours, around the driver's server
    selection) is explained by the last error the driver's monitor saw, when `client` is given."""
    if isinstance(exc, OperationFailure) and exc.code == AUTH_FAILED:
        return Unreachable("MongoDB", mask_uri(uri), exc, MONGO_AUTH_HINT)
    if isinstance(exc, TimeoutError):
        seen = _monitor_error(client) if client is not None else None
        if seen is None and timeout_s is not None:
            seen = f"no answer within {timeout_s:g} s"
        return Unreachable("MongoDB", mask_uri(uri), f"TimeoutError: {seen}" if seen else "TimeoutError", MONGO_HINT)
    return Unreachable("MongoDB", mask_uri(uri), exc, MONGO_HINT)


def _monitor_error(client: Client) -> str | None:
    """The last connection error of the first server the driver could not reach (None when none failed)."""
    with contextlib.suppress(Exception):
        for address, server in client.topology_description.server_descriptions().items():
            if server.error is not None:
                text = short_error(server.error)
                where = f"{address[0]}:{address[1]}"
                return text if text.startswith(where) else f"{where}: {text}"
    return None


def _mongo_hosts(uri: str) -> list[tuple[str, int]] | None:
    """host:port pairs of a plain `mongodb://` URI (None for SRV, sockets, or anything unusual)."""
    if not uri.lower().startswith("mongodb://"):
        return None
    rest = uri[len("mongodb://"):]
    rest = rest.rsplit("@", 1)[-1]
    hostlist = re.split(r"[/?]", rest, maxsplit=1)[0]
    out: list[tuple[str, int]] = []
    for entry in hostlist.split(","):
        if not entry or "%2F" in entry.upper() or entry.endswith(".sock"):
            return None
        if entry.startswith("["):  # [ipv6]:port
            host, _, port = entry[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = entry.partition(":")
        try:
            out.append((host, int(port or 27017)))
        except ValueError:
            return None
    return out or None


async def refused_everywhere(hosts: Sequence[tuple[str, int]], timeout_s: float) -> OSError | None:
    """The error when every host refuses a TCP connection at once (or its name does not resolve): nothing
    listens there, so waiting for the driver's server selection would only delay the answer. None when a
    host accepts, or when the check is not conclusive (a timeout: let the driver decide)."""
    first: OSError | None = None
    for host, port in hosts:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        except (ConnectionRefusedError, socket.gaierror) as exc:
            first = first or exc
            continue
        except (OSError, TimeoutError):
            return None
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None
    return first


async def check_mongo(client: Client, uri: str, timeout_s: float) -> None:
    """Ping within `timeout_s` in all (fails at once when nothing listens at any host); raises Unreachable."""
    started = time.monotonic()
    hosts = _mongo_hosts(uri)
    if hosts is not None:
        refused = await refused_everywhere(hosts, min(timeout_s, 1.0))
        if refused is not None:
            raise Unreachable("MongoDB", mask_uri(uri), refused, MONGO_HINT)
    try:
        await asyncio.wait_for(client.admin.command("ping"), max(timeout_s - (time.monotonic() - started), 0.1))
    except (PyMongoError, TimeoutError, OSError) as exc:
        raise mongo_error(uri, exc, client, timeout_s) from None


async def wait_for_mongo(client: Client, uri: str, deadline: float, stop: asyncio.Event | None = None) -> None:
    """Ping until it answers or `deadline` (time.monotonic()) passes; an authentication failure is final.
    Returns early (without raising) when `stop` is set."""
    last: BaseException | None = None
    delay = 0.25
    started = time.monotonic()
    while stop is None or not stop.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise mongo_error(uri, last or TimeoutError(), client, deadline - started)
        try:  # short attempts: a stop request is noticed within ATTEMPT_S
            await asyncio.wait_for(client.admin.command("ping"), min(remaining, ATTEMPT_S))
            return
        except OperationFailure as exc:
            if exc.code == AUTH_FAILED:
                raise mongo_error(uri, exc) from None
            last = exc
        except (PyMongoError, TimeoutError, OSError) as exc:
            last = exc
        if await _stopped(stop, min(delay, max(deadline - time.monotonic(), 0.0))):
            return
        delay = min(delay * 2, 2.0)


# --- Kafka ---------------------------------------------------------------------------------------------------
async def start_kafka(start: Callable[[], Awaitable[object]], bootstrap: Sequence[str] | str, timeout_s: float,
                      what: str = "Kafka") -> None:
    """Run a client's `start()` within `timeout_s` (aiokafka's can hang on an address that does not answer);
    raises Unreachable. The caller stops the client in every case (`finally`), so nothing is left unclosed."""
    try:
        with quiet_kafka_logs():
            await asyncio.wait_for(start(), max(timeout_s, 0.1))
    except TimeoutError:
        raise Unreachable(what, kafka_address(bootstrap), f"TimeoutError: no answer within {timeout_s:g} s",
                          KAFKA_HINT) from None
    except KAFKA_ERRORS as exc:
        raise Unreachable(what, kafka_address(bootstrap), exc, KAFKA_HINT) from None


async def probe_kafka(bootstrap: Sequence[str], options: Mapping[str, Any], timeout_s: float,
                      client_id: str = "ai-worker-probe") -> None:
    """Bootstrap a bare client (cluster metadata from one broker) and close it; raises Unreachable."""
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=list(bootstrap), client_id=client_id,
                            request_timeout_ms=max(int(timeout_s * 1000), 1000), **dict(options))
    try:
        await start_kafka(client.bootstrap, bootstrap, timeout_s)
    finally:
        with contextlib.suppress(Exception):
            await client.close()


async def wait_for_kafka(bootstrap: Sequence[str], options: Mapping[str, Any], deadline: float,
                         stop: asyncio.Event | None = None) -> None:
    """Probe until a broker answers or `deadline` passes (then raise the last Unreachable); returns early when
    `stop` is set."""
    delay = 0.25
    while stop is None or not stop.is_set():
        remaining = deadline - time.monotonic()
        try:
            await probe_kafka(bootstrap, options, max(min(remaining, ATTEMPT_S), 0.5))
            return
        except Unreachable:
            if deadline - time.monotonic() <= 0:
                raise
        if await _stopped(stop, min(delay, max(deadline - time.monotonic(), 0.0))):
            return
        delay = min(delay * 2, 2.0)


@contextlib.contextmanager
def quiet_kafka_logs() -> Iterator[None]:
    """aiokafka logs every refused connection at ERROR before it raises; the caller reports the failure
    once, so those lines are held back while connecting (DEBUG logging keeps them)."""
    logger = logging.getLogger("aiokafka")
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    before = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(before)


async def _stopped(stop: asyncio.Event | None, delay: float) -> bool:
    """Sleep `delay`; True when `stop` was (or gets) set meanwhile."""
    if stop is None:
        await asyncio.sleep(delay)
        return False
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
    return stop.is_set()


__all__ = ["KAFKA_ERRORS", "KAFKA_HINT", "MONGO_HINT", "Unreachable", "check_mongo", "kafka_address",
           "mask_uri", "mongo_client", "mongo_error", "probe_kafka", "quiet_kafka_logs", "refused_everywhere",
           "short_error", "start_kafka", "wait_for_kafka", "wait_for_mongo"]
