"""Helpers the batch jobs share: collecting up to N distinct items from an LLM, and naming.

A batch asks for what it still misses, drops duplicates and trims a surplus, at most MAX_ASKS times. It
keeps what it got: a batch short of its count after those asks hands the shortfall to the next batch of
its chain (which starts where this one ended), so the world's counts stay exact and no batch is lost for
one unusable item. Only a batch that got nothing usable fails (and is retried)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from ai_worker.errors import InvalidOutput

MAX_ASKS = 3
T = TypeVar("T")


async def collect(
    count: int,
    ask: Callable[[int, int, list[T]], Awaitable[Sequence[T]]],
    key: Callable[[T], str],
    taken: set[str],
) -> list[T]:
    """Up to `count` distinct items: `ask(number, missing, have)` is called for ask number 1, 2, ... with how
    many are missing and the items kept so far; duplicates (by key, against `taken` and each other) are
    dropped and a surplus trimmed, at most MAX_ASKS asks. Returns what it got (maybe fewer than `count`);
    raises InvalidOutput when it got nothing usable."""
    items: list[T] = []
    seen = set(taken)
    for number in range(1, MAX_ASKS + 1):
        missing = count - len(items)
        if missing <= 0:
            break
        for item in await ask(number, missing, items):
            k = key(item)
            if k in seen:
                continue
            seen.add(k)
            items.append(item)
    if count > 0 and not items:
        raise InvalidOutput(f"asked {MAX_ASKS} times for {count} items, got none usable")
    return items[:count]


def slug(text: str, fallback: str) -> str:
    s = re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")[:24]
    return s or fallback


def bullet_list(lines: Sequence[str], empty: str = "(none yet)") -> str:
    return "\n".join(f"- {line}" for line in lines) if lines else empty
