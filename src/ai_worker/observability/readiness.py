"""Readiness (`GET /ready`): can this worker do its work right now?

Named checks run concurrently, each bounded by its own timeout; the result is cached for `cache_s` (1 s) so
frequent probes from several places do not load the database, and concurrent probes share one run. A check
fails by raising; its error becomes the body's explanation. The worker's checks (see app.py):

- `mongodb`: a `ping` answered within 1 s;
- `kafka`: a metadata round trip over the producer's connections within 1.5 s;
- `consumer`: partitions assigned (the group is joined) and the poll loop polled recently;
- `worker`: not shutting down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from ai_worker.connectivity import short_error

log = structlog.get_logger(__name__)

# A check returns details to show (or None), or raises when it fails.
Check = Callable[[], Awaitable[Mapping[str, Any] | None]]


@dataclass(frozen=True)
class Probe:
    check: Check
    timeout_s: float = 1.0


class Readiness:
    def __init__(self, probes: Mapping[str, Probe], cache_s: float = 1.0) -> None:
        self._probes = dict(probes)
        self._cache_s = cache_s
        self._cached: tuple[float, bool, dict[str, Any]] | None = None
        self._lock = asyncio.Lock()

    async def result(self) -> tuple[bool, dict[str, Any]]:
        """(ready, body): body = {"status": "ready" | "not ready", "failed": [names], "checks": {name: {...}}}."""
        fresh = self._fresh()
        if fresh is not None:
            return fresh
        async with self._lock:  # probes arriving together share one run
            fresh = self._fresh()
            if fresh is not None:
                return fresh
            names = list(self._probes)
            outcomes = await asyncio.gather(*(self._run(self._probes[name]) for name in names))
            checks = dict(zip(names, outcomes, strict=True))
            failed = [name for name, outcome in checks.items() if not outcome["ok"]]
            body = {"status": "not ready" if failed else "ready", "failed": failed, "checks": checks}
            if self._cached is None or self._cached[1] != (not failed):  # log the changes only
                if failed:
                    log.warning("not ready", failed=failed, errors={n: checks[n].get("error") for n in failed})
                else:
                    log.info("ready")
            self._cached = (time.monotonic(), not failed, body)
            return not failed, body

    def _fresh(self) -> tuple[bool, dict[str, Any]] | None:
        if self._cached is None or time.monotonic() - self._cached[0] > self._cache_s:
            return None
        return self._cached[1], self._cached[2]

    @staticmethod
    async def _run(probe: Probe) -> dict[str, Any]:
        started = time.monotonic()
        try:
            details = await asyncio.wait_for(probe.check(), probe.timeout_s)
        except TimeoutError:
            return {"ok": False, "error": f"no answer within {probe.timeout_s:g} s"}
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {short_error(exc)}"}
        return {"ok": True, "ms": round(1000 * (time.monotonic() - started), 1), **(details or {})}


class NotReady(Exception):
    """Raised by a check that found the worker unable to work (the message says why)."""


__all__ = ["Check", "NotReady", "Probe", "Readiness"]
