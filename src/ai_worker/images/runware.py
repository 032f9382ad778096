"""Image generation through Runware's REST API (`POST https://api.runware.ai/v1`).

The request is a JSON array holding one `imageInference` task with a fresh `taskUUID`; the answer's
`data[0]` must carry the same `taskUUID` and an `imageURL`, which is downloaded (without the API key) and
normalised to exactly the requested size. Runware wants width and height in multiples of 64 within
128..2048, so each side is rounded up to a multiple of 64 and clamped; the image is then cover-resized and
centre-cropped back to the size asked for.

Error classification:
- transport errors and non-2xx statuses go through the shared helpers (`ai_worker.providers.http_errors`):
  429 -> RateLimited (with Retry-After), 408 -> ProviderTimeout, 5xx -> ProviderUnavailable, other 4xx
  (400 bad parameters, 401 bad key, ...) -> ProviderRejected. The same applies to the image download.
- a 2xx answer with a non-empty `errors` array is still an error, classified from its first entry:
  permanent ProviderRejected when it names a `parameter` or its code / message is about bad parameters,
  authentication or credits (`invalid...`, `missing...`, `unsupported...`, `...notFound`, "required",
  "must be", "api key", "auth", "unauthorized", "forbidden", "permission", "credit"); RateLimited when it
  is about rate limits ("rate limit", "too many", "throttled"); ProviderTimeout when about a timeout;
  retryable ProviderUnavailable for anything else (an upstream failure we cannot judge). The code is
  looked at before the message.
- a 2xx answer without the task's image (no `data`, another `taskUUID`, no `imageURL`) -> InvalidImage.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from typing import Any

import httpx
import structlog

from ai_worker.errors import (
    InvalidImage,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    WorkerError,
)
from ai_worker.images.base import PNG, GeneratedImage, Size
from ai_worker.images.openrouter import decode_data_url
from ai_worker.images.validate import normalize_image
from ai_worker.providers.http_errors import (
    attach_status,
    decode_json_body,
    error_for_body,
    error_for_status,
    error_for_transport,
)

log = structlog.get_logger(__name__)

RUNWARE_BASE_URL = "https://api.runware.ai/v1"
MIN_SIDE = 128
MAX_SIDE = 2048
SIDE_STEP = 64
_MAX_MESSAGE = 300

_PERMANENT_CODE_PREFIXES = ("invalid", "missing", "unsupported")
_PERMANENT_HINTS = (
    "notfound",
    "not found",
    "required",
    "must be",
    "apikey",
    "api key",
    "auth",
    "unauthori",
    "forbidden",
    "permission",
    "credit",
)
_RATE_HINTS = ("ratelimit", "rate limit", "rate_limit", "toomany", "too many", "throttl")
_TIMEOUT_HINTS = ("timeout", "timed out")


def runware_side(pixels: int) -> int:
    """A requested side rounded up to a multiple of 64 and clamped to Runware's 128..2048."""
    rounded = -(-pixels // SIDE_STEP) * SIDE_STEP
    return min(MAX_SIDE, max(MIN_SIDE, rounded))


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _kind(text: str, *, is_code: bool) -> type[WorkerError] | None:
    lowered = text.lower()
    if (is_code and lowered.startswith(_PERMANENT_CODE_PREFIXES)) or any(h in lowered for h in _PERMANENT_HINTS):
        return ProviderRejected
    if any(h in lowered for h in _RATE_HINTS):
        return RateLimited
    if any(h in lowered for h in _TIMEOUT_HINTS):
        return ProviderTimeout
    if not is_code and ("invalid" in lowered or "unsupported" in lowered):
        return ProviderRejected
    return None


def error_for_runware_errors(body: Mapping[str, Any], status_code: int | None = None) -> WorkerError | None:
    """The error a Runware `errors` array stands for (classified as the module docstring says), or None."""
    errors = body.get("errors")
    if not isinstance(errors, list) or not errors:
        return None
    first = errors[0]
    if isinstance(first, Mapping):
        code = str(first.get("code") or "")
        message = str(first.get("message") or "")
        parameter = first.get("parameter")
    else:
        code, message, parameter = "", str(first), None
    text = f"Runware error {code or 'unknown'!r}: {_short(message or str(first))}"
    if parameter:
        text += f" (parameter {parameter!r})"
    kind: type[WorkerError] | None = ProviderRejected if parameter else None
    kind = kind or _kind(code, is_code=True) or _kind(message, is_code=False) or ProviderUnavailable
    exc: WorkerError = RateLimited(text, retry_after_s=None) if kind is RateLimited else kind(text)
    return attach_status(exc, status_code)


def _result(body: Mapping[str, Any], task_uuid: str) -> Mapping[str, Any]:
    data = body.get("data")
    if not isinstance(data, list) or not data or not isinstance(data[0], Mapping):
        raise InvalidImage("Runware answer has no data")
    result: Mapping[str, Any] = data[0]
    if result.get("taskUUID") != task_uuid:
        raise InvalidImage(f"Runware answer is for task {result.get('taskUUID')!r}, not {task_uuid!r}")
    url = result.get("imageURL")
    if not isinstance(url, str) or not url:
        raise InvalidImage("Runware answer has no imageURL")
    return result


def _cost(result: Mapping[str, Any]) -> float:
    cost = result.get("cost")
    if isinstance(cost, int | float) and not isinstance(cost, bool):
        return float(cost or 0)
    return 0.0


class RunwareImageProvider:
    name = "runware"

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        model: str,
        timeout_s: float,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.model = model
        self._url = base_url.rstrip("/")
        self._api_key = api_key
        self._timeout = httpx.Timeout(timeout_s, connect=10.0)
        self._owns_http = http is None
        self._http = http if http is not None else httpx.AsyncClient(timeout=self._timeout)

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _task(self, task_uuid: str, prompt: str, width: int, height: int) -> dict[str, Any]:
        return {
            "taskType": "imageInference",
            "taskUUID": task_uuid,
            "positivePrompt": prompt,
            "model": self.model,
            "width": width,
            "height": height,
            "numberResults": 1,
            "outputType": "URL",
            "outputFormat": "PNG",
            "includeCost": True,
        }

    async def generate(self, prompt: str, width: int, height: int, *, source: Size | None = None
                       ) -> GeneratedImage:
        """An image of exactly width x height; Runware is asked for `source` (default: that size), rounded to
        its grid, and the answer is normalised (Runware prices by resolution: a smaller source is cheaper)."""
        task_uuid = str(uuid.uuid4())
        src_width, src_height = source or (width, height)
        ask_width, ask_height = runware_side(src_width), runware_side(src_height)
        if (ask_width, ask_height) != (width, height):
            log.debug("runware_size_adjusted", width=width, height=height, sent_width=ask_width, sent_height=ask_height)
        try:
            response = await self._http.post(
                self._url,
                json=[self._task(task_uuid, prompt, ask_width, ask_height)],
                headers=self._headers(),
                timeout=self._timeout,
            )
        except httpx.HTTPError as exc:
            raise error_for_transport(exc) from exc
        http_error = error_for_status(response)
        if http_error is not None:
            raise http_error
        body = decode_json_body(response)
        body_error = error_for_runware_errors(body, response.status_code) or error_for_body(body, response.status_code)
        if body_error is not None:
            raise body_error
        try:
            result = _result(body, task_uuid)
        except WorkerError as exc:
            raise attach_status(exc, response.status_code) from None
        url = str(result["imageURL"])
        if url.startswith("data:"):
            try:
                data, declared = decode_data_url(url)
            except WorkerError as exc:
                raise attach_status(exc, response.status_code) from None
        elif url.startswith(("http://", "https://")):
            data, declared = await self._download(url)
        else:
            raise attach_status(InvalidImage(f"unsupported imageURL scheme: {url[:40]!r}"), response.status_code)
        try:
            png = await asyncio.to_thread(normalize_image, data, declared, width, height)
        except WorkerError as exc:
            raise attach_status(exc, response.status_code) from None
        return GeneratedImage(
            data=png,
            content_type=PNG,
            width=width,
            height=height,
            model=self.model,
            provider=self.name,
            cost=_cost(result),
        )

    async def _download(self, url: str) -> tuple[bytes, str | None]:
        """The image bytes behind `imageURL` (a public URL: the API key is not sent). A 4xx here means the
        generated file is not (yet) there, not that our request was wrong: `InvalidImage`, retryable, so
        the generation is tried again."""
        try:
            response = await self._http.get(url, timeout=self._timeout)
        except httpx.HTTPError as exc:
            raise error_for_transport(exc) from exc
        http_error = error_for_status(response)
        if http_error is not None:
            if not http_error.retryable:
                raise attach_status(InvalidImage(f"generated image could not be downloaded: {http_error}"),
                                    response.status_code) from None
            raise http_error
        return response.content, response.headers.get("content-type")
