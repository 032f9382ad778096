"""Lenient reading of a model's JSON reply (llm/parsing.py)."""

from __future__ import annotations

import json

import pytest

from ai_worker.llm.parsing import (
    CODE_FENCE,
    CONTROL_CHARACTERS,
    SURROUNDING_TEXT,
    ReplyNotJSON,
    describe_json_error,
    parse_json_reply,
)

OBJ = {"caption": "Morning at the docks", "tags": ["harbour"]}


def test_strict_json_needs_no_leniency() -> None:
    parsed = parse_json_reply("  " + json.dumps(OBJ) + "\n")
    assert parsed.data == OBJ and parsed.lenient == ()


def test_raw_control_characters_inside_strings() -> None:
    # What llama-cpp-python's grammar lets through: a raw newline and a tab inside a string value.
    text = '{"caption": "Morning\nat the\tdocks", "tags": ["harbour"]}'
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    parsed = parse_json_reply(text)
    assert parsed.data["caption"] == "Morning\nat the\tdocks"
    assert parsed.lenient == (CONTROL_CHARACTERS,)


@pytest.mark.parametrize("text", [
    "```json\n" + json.dumps(OBJ) + "\n```",
    "```\n" + json.dumps(OBJ) + "```",
    "Here you are:\n```json\n" + json.dumps(OBJ, indent=2) + "\n```\nEnjoy!",
])
def test_code_fences(text: str) -> None:
    parsed = parse_json_reply(text)
    assert parsed.data == OBJ
    assert parsed.lenient == (CODE_FENCE,)


@pytest.mark.parametrize("text", [
    "Sure! Here is the JSON: " + json.dumps(OBJ),
    json.dumps(OBJ) + "\n\nI hope this helps.",
    "Note {not json} first, then " + json.dumps(OBJ) + " and a trailing } brace",
    json.dumps(OBJ) + "\n\n\n\n   \n" + "}",
])
def test_text_around_the_object(text: str) -> None:
    parsed = parse_json_reply(text)
    assert parsed.data == OBJ
    assert parsed.lenient == (SURROUNDING_TEXT,)


def test_all_three_at_once() -> None:
    text = 'Answer:\n```json\n{"caption": "line one\nline two", "tags": []}\n```\nbye {'
    parsed = parse_json_reply(text)
    assert parsed.data == {"caption": "line one\nline two", "tags": []}
    assert set(parsed.lenient) == {CODE_FENCE, CONTROL_CHARACTERS}


def test_fence_with_text_and_control_characters_inside() -> None:
    text = '```json\nsure: {"caption": "a\nb", "tags": []} done\n```'
    parsed = parse_json_reply(text)
    assert parsed.data == {"caption": "a\nb", "tags": []}
    assert parsed.lenient == (CODE_FENCE, SURROUNDING_TEXT, CONTROL_CHARACTERS)


@pytest.mark.parametrize(("text", "reason"), [
    ("", "the reply was empty"),
    ("   \n", "the reply was empty"),
    ('{"caption": "cut off at the tok', "Unterminated string starting at line 1 column 13"),
    ('{"caption": "x" "tags": []}', "Expecting ',' delimiter at line 1 column 17"),
    ("no json here at all", "Expecting value at line 1 column 1"),
])
def test_what_is_not_json_says_why(text: str, reason: str) -> None:
    with pytest.raises(ReplyNotJSON) as info:
        parse_json_reply(text)
    assert reason in str(info.value)
    assert "at at" not in str(info.value)


def test_json_error_message_never_says_at_at() -> None:
    # json's own message for a control character ends in "at": "Invalid control character at".
    with pytest.raises(json.JSONDecodeError) as info:
        json.loads('{"a": "x\ny"}')
    assert info.value.msg.endswith(" at")
    text = describe_json_error(info.value)
    assert text == "Invalid control character at line 1 column 9"
    assert "at at" not in text


def test_a_top_level_array_is_returned_as_is() -> None:
    # The schema check, not the parser, rejects what is not an object.
    assert parse_json_reply("[1, 2]").data == [1, 2]
