"""Structured-output modes: how a request asks an OpenAI-compatible server for JSON that fits a schema.

- `json_schema`: `response_format: {"type": "json_schema", "json_schema": {"name", "strict", "schema"}}`,
  OpenAI's structured outputs (OpenAI, OpenRouter, llama.cpp's llama-server, vLLM, recent Ollama).
- `json_object`: `response_format: {"type": "json_object", "schema": ...}`: llama-cpp-python's server
  turns the schema into a grammar. The prompt stays as written: small models echo a schema's
  descriptions into their answer (measured with SmolLM2-135M), and the grammar already holds the shape. A
  server that only knows plain JSON mode ignores `schema`: use `prompt` mode there.
- `prompt`: no `response_format` at all; the schema is written into the system prompt and the reply is
  validated afterwards (any chat server).

A model's registry entry picks one (`structured_output`), or "auto": start with json_schema and, when
the server rejects the mode (a 4xx, or a 5xx whose message names response_format / json_schema), move to
the next mode in FALLBACK_ORDER and re-send at once. The mode that worked is remembered per model for the
life of the process (`ModeMemory`) and logged once. A rejection is never an outage: it does not count
against the circuit breaker and is not retried as a transient error.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import structlog
from pydantic import BaseModel

from ai_worker.errors import ProviderRejected, ProviderUnavailable, RateLimited, WorkerError
from ai_worker.llm.schema import strict_json_schema
from ai_worker.providers.http_errors import status_of
from ai_worker.providers.registry import ResolvedModel

Mode = Literal["json_schema", "json_object", "prompt"]
FALLBACK_ORDER: tuple[Mode, ...] = ("json_schema", "json_object", "prompt")

log = structlog.get_logger(__name__)

# What a server says when it does not take our response_format (llama-cpp-python: "response_format.type:
# Input should be 'text' or 'json_object'"; vLLM / others name json_schema or guided decoding).
_MODE_WORDS = re.compile(r"response_format|json_schema|json_object|guided_json|structured output", re.IGNORECASE)


def response_format(mode: Mode, schema: type[BaseModel]) -> dict[str, Any] | None:
    """The `response_format` field of a request in `mode` (None: the field is not sent)."""
    if mode == "json_schema":
        return {
            "type": "json_schema",
            "json_schema": {"name": schema.__name__, "strict": True, "schema": strict_json_schema(schema)},
        }
    if mode == "json_object":
        return {"type": "json_object", "schema": strict_json_schema(schema)}
    return None


def schema_instruction(schema: type[BaseModel]) -> str:
    """The sentence added to the system prompt when the server does not see the schema (prompt mode)."""
    compact = json.dumps(strict_json_schema(schema), separators=(",", ":"), ensure_ascii=False)
    return (
        "Reply with one JSON object and nothing else: no code fence, no text before or after it. "
        f"The object must match this JSON schema:\n{compact}"
    )


def messages_for(mode: Mode, messages: list[dict[str, str]], schema: type[BaseModel]) -> list[dict[str, str]]:
    """The messages of a request in `mode`: prompt mode carries the schema in the system prompt (a system
    message is added when there is none); the other modes give it to the server."""
    if mode != "prompt":
        return messages
    instruction = schema_instruction(schema)
    out = [dict(m) for m in messages]
    for message in out:
        if message.get("role") == "system":
            message["content"] = f"{message.get('content', '')}\n\n{instruction}".strip()
            return out
    return [{"role": "system", "content": instruction}, *out]


def is_mode_rejection(exc: WorkerError, mode: Mode) -> bool:
    """Did the server refuse the request because of its structured-output mode? A 4xx other than 429 /
    408 (ProviderRejected), or a 5xx (ProviderUnavailable with an HTTP status), whose message names the
    response format. A request without response_format (prompt mode) cannot be refused for it."""
    if mode == "prompt" or isinstance(exc, RateLimited):
        return False
    if not isinstance(exc, ProviderRejected | ProviderUnavailable):
        return False
    if isinstance(exc, ProviderUnavailable) and status_of(exc) is None:
        return False  # a connection error, a timeout: never about the request's content
    return _MODE_WORDS.search(str(exc)) is not None


class ModeMemory:
    """The structured-output mode of each model, in this process: the registry's choice, or for "auto"
    json_schema until the server rejects it, then the next mode that it takes."""

    def __init__(self) -> None:
        self._learned: dict[str, Mode] = {}

    def current(self, model: ResolvedModel) -> Mode:
        if model.structured_output != "auto":
            return model.structured_output
        return self._learned.get(model.id, FALLBACK_ORDER[0])

    def learned(self) -> dict[str, Mode]:
        """model id -> the mode auto-detection settled on (only models that had to fall back)."""
        return dict(self._learned)

    def demote(self, model: ResolvedModel, rejected: Mode, reason: str) -> Mode | None:
        """The server rejected `rejected`: the mode to use from now on, or None when there is none (the
        model's mode was set explicitly, or every mode was rejected). Concurrent rejections of the same
        mode move the model one step only."""
        if model.structured_output != "auto":
            return None
        current = self.current(model)
        if current != rejected:  # another request already moved it on
            return current
        index = FALLBACK_ORDER.index(rejected)
        if index + 1 >= len(FALLBACK_ORDER):
            return None
        chosen = FALLBACK_ORDER[index + 1]
        self._learned[model.id] = chosen
        log.warning("llm_structured_output_mode", model=model.id, rejected=rejected, mode=chosen,
                    reason=reason[:300],
                    hint=f'set structured_output = "{chosen}" in the model registry to skip the detection')
        return chosen
