"""Helpers the batch jobs share: exact-count batches and naming."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from ai_worker.errors import InvalidOutput

MAX_ASKS = 3
T = TypeVar("T")


async def exact_count(
    count: int,
    ask: Callable[[int, list[T]], Awaitable[Sequence[T]]],
    key: Callable[[T], str],
    taken: set[str],
) -> list[T]:
    """Ask for `count` items, dropping duplicates (by key, against `taken` and each other), trimming
    surplus and asking again for a shortfall, at most MAX_ASKS times."""
    items: list[T] = []
    seen = set(taken)
    for _ in range(MAX_ASKS):
        missing = count - len(items)
        if missing <= 0:
            break
        for item in await ask(missing, items):
            k = key(item)
            if k in seen:
                continue
            seen.add(k)
            items.append(item)
    if len(items) < count:
        raise InvalidOutput(f"asked {MAX_ASKS} times for {count} items, got {len(items)} usable")
    return items[:count]


def slug(text: str, fallback: str) -> str:
    s = re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")[:24]
    return s or fallback


def bullet_list(lines: Sequence[str], empty: str = "(none yet)") -> str:
    return "\n".join(f"- {line}" for line in lines) if lines else empty
