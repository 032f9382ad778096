"""Image generation through an OpenAI-compatible chat endpoint with image output (OpenRouter's
`modalities: ["image", "text"]`). The image comes back as a data URL in `choices[0].message.images`."""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Mapping
from typing import Any

import httpx
import structlog

from ai_worker.errors import InvalidImage, WorkerError
from ai_worker.images.base import PNG, GeneratedImage, Size
from ai_worker.images.validate import normalize_image
from ai_worker.providers.http_errors import (
    attach_status,
    decode_json_body,
    error_for_body,
    error_for_status,
    error_for_transport,
)

log = structlog.get_logger(__name__)

# Aspect ratios OpenRouter's `image_config.aspect_ratio` accepts; we ask for the nearest and crop.
_ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")


def nearest_aspect_ratio(width: int, height: int) -> str:
    target = width / height

    def distance(ratio: str) -> float:
        w, h = ratio.split(":")
        return abs(int(w) / int(h) - target)

    return min(_ASPECT_RATIOS, key=distance)


def size_hint(width: int, height: int) -> str:
    return f"Image size: {width}x{height} pixels (aspect ratio {nearest_aspect_ratio(width, height)})."


def decode_data_url(url: str) -> tuple[bytes, str | None]:
    """Bytes and declared MIME type of a `data:<type>;base64,<data>` URL."""
    if not url.startswith("data:"):
        raise InvalidImage("image URL is not a data URL")
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise InvalidImage("malformed data URL: no comma")
    parts = header.split(";")
    content_type = parts[0].strip() or None
    if "base64" not in (p.strip().lower() for p in parts[1:]):
        raise InvalidImage("data URL is not base64-encoded")
    try:
        data = base64.b64decode(payload.strip(), validate=False)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage(f"data URL payload is not valid base64: {exc}") from None
    return data, content_type


def _image_url(body: Mapping[str, Any]) -> str:
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        raise InvalidImage("response has no choices")
    message = choices[0].get("message")
    if not isinstance(message, Mapping):
        raise InvalidImage("response has no message")
    images = message.get("images")
    if isinstance(images, list):
        for item in images:
            if not isinstance(item, Mapping):
                continue
            image_url = item.get("image_url")
            if isinstance(image_url, Mapping) and isinstance(image_url.get("url"), str):
                return str(image_url["url"])
            if isinstance(image_url, str):
                return image_url
    text = message.get("content")
    hint = f" (model said: {str(text)[:200]!r})" if text else ""
    raise InvalidImage(f"response contains no image{hint}")


def _cost(body: Mapping[str, Any]) -> float:
    usage = body.get("usage")
    if isinstance(usage, Mapping):
        cost = usage.get("cost")
        if isinstance(cost, int | float) and not isinstance(cost, bool):
            return float(cost)
    return 0.0


class OpenRouterImageProvider:
    name = "openrouter"

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        model: str,
        timeout_s: float,
        send_openrouter_extras: bool,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.model = model
        self.name = "openrouter" if send_openrouter_extras else "openai-compatible"
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key
        self._extras = send_openrouter_extras
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

    def _payload(self, prompt: str, width: int, height: int) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": f"{prompt}\n\n{size_hint(width, height)}"}],
            "modalities": ["image", "text"],
        }
        if self._extras:
            payload["usage"] = {"include": True}
            payload["image_config"] = {"aspect_ratio": nearest_aspect_ratio(width, height)}
        return payload

    async def generate(self, prompt: str, width: int, height: int, *, source: Size | None = None
                       ) -> GeneratedImage:
        # `source` is ignored: image-output chat models price per image, whatever the size asked.
        try:
            response = await self._http.post(
                self._url,
                json=self._payload(prompt, width, height),
                headers=self._headers(),
                timeout=self._timeout,
            )
        except httpx.HTTPError as exc:
            raise error_for_transport(exc) from exc
        http_error = error_for_status(response)
        if http_error is not None:
            raise http_error
        body = decode_json_body(response)
        body_error = error_for_body(body, response.status_code)
        if body_error is not None:
            raise body_error
        try:
            url = _image_url(body)
            if url.startswith(("http://", "https://")):
                data, declared = await self._download(url)
            else:
                data, declared = decode_data_url(url)
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
            cost=_cost(body),
        )

    async def _download(self, url: str) -> tuple[bytes, str | None]:
        """Some providers answer with a hosted URL instead of a data URL."""
        try:
            response = await self._http.get(url, timeout=self._timeout)
        except httpx.HTTPError as exc:
            raise error_for_transport(exc) from exc
        http_error = error_for_status(response)
        if http_error is not None:
            raise http_error
        return response.content, response.headers.get("content-type")
