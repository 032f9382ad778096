"""collect: up to N distinct items from a model that over- or under-delivers (a shortfall is kept, only
nothing usable fails); slug."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from ai_worker.errors import InvalidOutput
from ai_worker.jobs.common import MAX_ASKS, collect, slug


class Asker:
    """Returns the scripted replies in order (empty once they run out) and records every call."""

    def __init__(self, *replies: list[str]) -> None:
        self.replies = list(replies)
        self.calls: list[tuple[int, list[str]]] = []

    async def __call__(self, number: int, missing: int, have: list[str]) -> Sequence[str]:
        assert number == len(self.calls) + 1
        self.calls.append((missing, list(have)))
        return self.replies.pop(0) if self.replies else []


def _key(s: str) -> str:
    return s.lower()


async def test_exact_reply_asks_once() -> None:
    ask = Asker(["a", "b", "c"])
    assert await collect(3, ask, _key, set()) == ["a", "b", "c"]
    assert ask.calls == [(3, [])]


async def test_surplus_is_trimmed() -> None:
    ask = Asker(["a", "b", "c", "d", "e"])
    assert await collect(3, ask, _key, set()) == ["a", "b", "c"]
    assert len(ask.calls) == 1


async def test_duplicates_dropped_against_taken_and_each_other() -> None:
    ask = Asker(["taken1", "x", "X", "y", "TAKEN2", "z"])
    result = await collect(3, ask, _key, {"taken1", "taken2"})
    assert result == ["x", "y", "z"]
    assert len(ask.calls) == 1


async def test_taken_is_not_mutated() -> None:
    taken = {"a"}
    await collect(1, Asker(["b"]), _key, taken)
    assert taken == {"a"}


async def test_shortfall_is_asked_again_for_the_missing_number() -> None:
    ask = Asker(["a", "b"], ["b", "c", "d"], ["e", "f"])
    result = await collect(5, ask, _key, set())
    assert result == ["a", "b", "c", "d", "e"]
    assert ask.calls == [(5, []), (3, ["a", "b"]), (1, ["a", "b", "c", "d"])]


async def test_a_shortfall_after_max_asks_keeps_what_it_got() -> None:
    assert MAX_ASKS == 3
    ask = Asker(["a"], ["a"], ["b"], ["c", "d"])
    assert await collect(4, ask, _key, set()) == ["a", "b"]
    assert len(ask.calls) == 3


async def test_nothing_usable_after_max_asks_is_invalid_output() -> None:
    ask = Asker([], [], [])
    with pytest.raises(InvalidOutput) as info:
        await collect(4, ask, _key, set())
    assert len(ask.calls) == 3
    assert "4" in str(info.value)


async def test_only_duplicates_fails() -> None:
    ask = Asker(["dup"], ["dup"], ["dup"])
    with pytest.raises(InvalidOutput):
        await collect(1, ask, _key, {"dup"})
    assert len(ask.calls) == 3


async def test_success_on_third_ask() -> None:
    ask = Asker([], [], ["a", "b"])
    assert await collect(2, ask, _key, set()) == ["a", "b"]
    assert len(ask.calls) == 3


async def test_zero_count_never_asks() -> None:
    ask = Asker(["a"])
    assert await collect(0, ask, _key, set()) == []
    assert ask.calls == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello World!", "hello_world"),
        ("  __Already_Ok__  ", "already_ok"),
        ("user.name-42", "user_name_42"),
        ("a" * 40, "a" * 24),
        ("MiXeD123", "mixed123"),
        ("Zoë", "zo"),
    ],
)
def test_slug(text: str, expected: str) -> None:
    assert slug(text, "fallback") == expected


@pytest.mark.parametrize("text", ["", "!!!", "Привет", "___", "   "])
def test_slug_fallback(text: str) -> None:
    assert slug(text, "character_3") == "character_3"


def test_slug_output_charset() -> None:
    for text in ["Ünïcödé & friends", "x" * 100, "A b C d E", "tab\tnew\nline"]:
        s = slug(text, "fb")
        assert s
        assert len(s) <= 24
        assert set(s) <= set("abcdefghijklmnopqrstuvwxyz0123456789_")
