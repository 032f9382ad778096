"""Finding the platform's gRPC services: a static address from the settings, or Consul's health API.

Consul is asked for `/v1/health/service/NAME?passing=true`; each healthy entry is dialled at
`Service.Address:Service.Port`, or `NAME:Service.Port` when the service registered no address
(CONTRACTS.md). Answers are cached per name for `cache_s` seconds and handed out round-robin;
`invalidate(name)` drops the cache so the next call asks Consul again (the clients do this on
UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from ai_worker.errors import PlatformUnavailable

# The Consul names of the four platform services, as the settings key them.
CHARACTER_SERVICE = "character-service"
MEDIA_SERVICE = "media-service"
POST_SERVICE = "post-service"
WORLD_SERVICE = "world-service"


@dataclass
class _Entry:
    addresses: list[str]
    expires_at: float
    counter: itertools.count[int] = field(default_factory=itertools.count)

    def next_address(self) -> str:
        return self.addresses[next(self.counter) % len(self.addresses)]


def parse_consul_address(address: str) -> tuple[str, str, int]:
    """`consul:8500`, `http://consul:8500` or `https://consul` -> (scheme, host, port)."""
    text = address.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    scheme = parts.scheme or "http"
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if scheme == "https" else 8500)
    return scheme, host, port


def addresses_from_health(name: str, entries: list[dict[str, Any]]) -> list[str]:
    """Dial addresses from a `/v1/health/service` answer, in Consul's order."""
    out: list[str] = []
    for entry in entries:
        service = entry.get("Service") or {}
        port = service.get("Port")
        if not port:
            continue
        host = service.get("Address") or name
        out.append(f"{host}:{int(port)}")
    return out


class ServiceResolver:
    """Resolves a service name to "host:port"; static overrides win over Consul."""

    def __init__(
        self,
        consul_address: str,
        static: dict[str, str | None],
        cache_s: float,
        *,
        timeout_s: float = 5.0,
    ) -> None:
        self._consul_address = consul_address
        self._static = {name: addr.strip() for name, addr in static.items() if addr and addr.strip()}
        self._cache_s = cache_s
        self._timeout_s = timeout_s
        self._cache: dict[str, _Entry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._consul: Any = None

    def static_address(self, name: str) -> str | None:
        return self._static.get(name)

    async def resolve(self, name: str) -> str:
        static = self._static.get(name)
        if static is not None:
            return static
        entry = self._cache.get(name)
        if entry is not None and entry.expires_at > time.monotonic():
            return entry.next_address()
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            entry = self._cache.get(name)
            if entry is None or entry.expires_at <= time.monotonic():
                addresses = await self._ask_consul(name)
                entry = _Entry(addresses=addresses, expires_at=time.monotonic() + self._cache_s)
                self._cache[name] = entry
        return entry.next_address()

    def invalidate(self, name: str) -> None:
        self._cache.pop(name, None)

    async def close(self) -> None:
        consul, self._consul = self._consul, None
        if consul is not None:
            await consul.close()

    async def _ask_consul(self, name: str) -> list[str]:
        try:
            async with asyncio.timeout(self._timeout_s):
                _index, entries = await self._client().health.service(name, passing=True)
        except PlatformUnavailable:
            raise
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise PlatformUnavailable(
                f"cannot reach Consul at {self._consul_address} to resolve {name}: {exc!r}"
            ) from exc
        except Exception as exc:  # py-consul raises its own ConsulException family on HTTP errors
            raise PlatformUnavailable(f"Consul lookup of {name} failed: {exc!r}") from exc
        addresses = addresses_from_health(name, list(entries or []))
        if not addresses:
            raise PlatformUnavailable(f"no healthy instance of {name} registered in Consul")
        return addresses

    def _client(self) -> Any:
        if self._consul is None:
            import consul.aio  # imported lazily: its HTTP session must be created inside the loop

            scheme, host, port = parse_consul_address(self._consul_address)
            self._consul = consul.aio.Consul(host=host, port=port, scheme=scheme)
        return self._consul
