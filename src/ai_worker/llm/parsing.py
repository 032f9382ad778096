"""Lenient reading of a model's JSON reply.

A reply that is JSON in all but its wrapping or its string escapes is accepted without a repair request:

- a Markdown code fence around the object (```json ... ```), anywhere in the reply;
- raw control characters (a newline, a tab) inside JSON strings, which the strict parse rejects
  ("Invalid control character") and some servers' grammars let through;
- text before or after the object ("Here is the JSON: {...} Hope this helps").

Each leniency used is named in the result (`ParsedReply.lenient`) so the history shows it. Anything else
(a cut-off object, a missing comma, no object at all) raises `ReplyNotJSON` with a readable reason, which
the client turns into its one repair request.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*[ \t]*\r?\n?(.*?)```", re.DOTALL)
_MAX_OBJECT_STARTS = 20  # how many '{' positions to try when the reply has text around the object

CODE_FENCE = "code fence"
CONTROL_CHARACTERS = "control characters in strings"
SURROUNDING_TEXT = "text around the object"


class ReplyNotJSON(ValueError):
    """The reply holds no JSON object, even read leniently; the message says why."""


@dataclass(frozen=True)
class ParsedReply:
    data: Any
    lenient: tuple[str, ...] = ()  # the leniencies needed, empty for a strictly valid reply


def describe_json_error(exc: json.JSONDecodeError) -> str:
    """"Expecting ',' delimiter at line 1 column 9" (json's own message for control characters already
    ends in "at": it is not doubled)."""
    msg = exc.msg.rstrip()
    if msg.endswith(" at"):
        msg = msg[: -len(" at")]
    return f"{msg} at line {exc.lineno} column {exc.colno}"


def _loads(text: str, *, strict: bool) -> Any:
    return json.loads(text, strict=strict)


def _object_inside(text: str) -> tuple[Any, bool] | None:
    """The first JSON object embedded in `text` (raw_decode from each '{'), and whether it needed
    strict=False; None when there is none."""
    strict_decoder = json.JSONDecoder(strict=True)
    lenient_decoder = json.JSONDecoder(strict=False)
    start = text.find("{")
    tried = 0
    while start != -1 and tried < _MAX_OBJECT_STARTS:
        tried += 1
        for decoder, needed_lenient in ((strict_decoder, False), (lenient_decoder, True)):
            try:
                value, _end = decoder.raw_decode(text, start)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value, needed_lenient
            break
        start = text.find("{", start + 1)
    return None


def parse_json_reply(content: str) -> ParsedReply:
    """The JSON value of a model's reply, read leniently (see the module docstring)."""
    text = content.strip()
    if not text:
        raise ReplyNotJSON("the reply was empty")
    try:
        return ParsedReply(_loads(text, strict=True))
    except json.JSONDecodeError:
        pass

    notes: list[str] = []
    fence = _FENCE.search(text)
    if fence is not None:
        text = fence.group(1).strip()
        notes.append(CODE_FENCE)
        try:
            return ParsedReply(_loads(text, strict=True), tuple(notes))
        except json.JSONDecodeError:
            pass
    try:
        return ParsedReply(_loads(text, strict=False), (*notes, CONTROL_CHARACTERS))
    except json.JSONDecodeError as exc:
        error = exc

    found = _object_inside(text)
    if found is not None:
        value, needed_lenient = found
        notes.append(SURROUNDING_TEXT)
        if needed_lenient:
            notes.append(CONTROL_CHARACTERS)
        return ParsedReply(value, tuple(notes))
    raise ReplyNotJSON(f"the reply is not valid JSON ({describe_json_error(error)})")
