"""Classification of HTTP outcomes of an OpenAI-compatible provider into the worker's error classes.

Shared by the LLM client and the OpenRouter image provider so both draw the retryable / permanent line
in the same place: 429 -> RateLimited, 5xx and connection errors -> ProviderUnavailable, timeouts ->
ProviderTimeout, any other 4xx -> ProviderRejected. An HTTP 200 body can still carry an `error` object
(OpenRouter does this when the upstream provider fails); its `code` is classified the same way.
"""

from __future__ import annotations

import email.utils
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import httpx

from ai_worker.errors import (
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    WorkerError,
)

_STATUS_ATTR = "http_status"
_MAX_MESSAGE = 300


def attach_status(exc: WorkerError, status_code: int | None) -> WorkerError:
    """Remember the HTTP status an error came from (read back with `status_of`)."""
    setattr(exc, _STATUS_ATTR, status_code)
    return exc


def status_of(exc: BaseException) -> int | None:
    value = getattr(exc, _STATUS_ATTR, None)
    return value if isinstance(value, int) else None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date; None when absent/bad."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds)


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _message_from_body(response: httpx.Response) -> str:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        return _short(response.text)
    if isinstance(body, Mapping):
        err = body.get("error")
        if isinstance(err, Mapping) and err.get("message"):
            return _short(str(err["message"]))
        if isinstance(err, str):
            return _short(err)
    return _short(json.dumps(body)[:_MAX_MESSAGE])


def error_for_status(response: httpx.Response) -> WorkerError | None:
    """The error an HTTP response stands for, or None for a 2xx."""
    code = response.status_code
    if 200 <= code < 300:
        return None
    message = f"HTTP {code}: {_message_from_body(response)}"
    exc: WorkerError
    if code == 429:
        exc = RateLimited(message, retry_after_s=parse_retry_after(response.headers.get("retry-after")))
    elif code == 408:
        exc = ProviderTimeout(message)
    elif code >= 500:
        exc = ProviderUnavailable(message)
    else:
        exc = ProviderRejected(message)
    return attach_status(exc, code)


def _code_as_int(code: Any) -> int | None:
    if isinstance(code, bool):
        return None
    if isinstance(code, int):
        return code
    if isinstance(code, str) and code.strip().isdigit():
        return int(code.strip())
    return None


def error_for_body(body: Mapping[str, Any], status_code: int | None = None) -> WorkerError | None:
    """The error carried by a 2xx body (`error` at the top or in the first choice), or None."""
    err = body.get("error")
    if err is None:
        choices = body.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
            err = choices[0].get("error")
    if err is None:
        return None
    if isinstance(err, Mapping):
        raw_code = err.get("code")
        message = _short(str(err.get("message") or err))
    else:
        raw_code = None
        message = _short(str(err))
    code = _code_as_int(raw_code)
    text = f"provider error {raw_code!r}: {message}"
    exc: WorkerError
    if code == 429 or (isinstance(raw_code, str) and "rate" in raw_code.lower()):
        retry_after = None
        if isinstance(err, Mapping):
            meta = err.get("metadata")
            if isinstance(meta, Mapping):
                retry_after = parse_retry_after(str(meta["retry_after"])) if "retry_after" in meta else None
        exc = RateLimited(text, retry_after_s=retry_after)
    elif code == 408 or (isinstance(raw_code, str) and "timeout" in raw_code.lower()):
        exc = ProviderTimeout(text)
    elif code is not None and code >= 500:
        exc = ProviderUnavailable(text)
    else:
        exc = ProviderRejected(text)
    return attach_status(exc, status_code)


def error_for_transport(exc: httpx.HTTPError) -> WorkerError:
    """Map an httpx exception raised before a response arrived."""
    if isinstance(exc, httpx.TimeoutException):
        return ProviderTimeout(f"timed out: {type(exc).__name__}")
    if isinstance(exc, httpx.TransportError):
        return ProviderUnavailable(f"connection failed: {type(exc).__name__}: {_short(str(exc))}")
    return ProviderUnavailable(f"HTTP error: {type(exc).__name__}: {_short(str(exc))}")


def decode_json_body(response: httpx.Response) -> dict[str, Any]:
    """The JSON object of a 2xx response; a non-JSON or non-object body is the provider's fault."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise attach_status(
            ProviderUnavailable(f"HTTP {response.status_code} with a body that is not JSON"),
            response.status_code,
        ) from None
    if not isinstance(body, dict):
        raise attach_status(
            ProviderUnavailable(f"HTTP {response.status_code} with a JSON body that is not an object"),
            response.status_code,
        )
    return body
