"""The Media presigned upload flow: get a URL -> HTTP PUT the bytes -> confirm."""

from __future__ import annotations

import time
from typing import Any

import httpx
import structlog
from pydantic import BaseModel, model_validator

from ai_worker.errors import UploadFailed
from ai_worker.images.base import GeneratedImage
from ai_worker.platform.clients import MediaClient, MediaKind
from ai_worker.providers.history import ApiRequestRecord, CallContext, Recorder

log = structlog.get_logger(__name__)


class UploadedMedia(BaseModel):
    """A confirmed upload: the media id the platform's services take, and the URL of its first variant
    (empty when the Media service returned none). Memoised in task steps; a step stored by an older worker
    as a bare media id string reads back with an empty URL."""

    media_id: str
    url: str = ""

    @model_validator(mode="before")
    @classmethod
    def _from_media_id(cls, value: Any) -> Any:
        return {"media_id": value} if isinstance(value, str) else value


class MediaUploader:
    def __init__(self, media: MediaClient, http: httpx.AsyncClient, recorder: Recorder | None = None) -> None:
        self._media = media
        self._http = http
        self._recorder = recorder

    async def upload(
        self, *, world_id: str, character_id: str, filename: str, media_type: MediaKind, image: GeneratedImage,
        call: CallContext,
    ) -> UploadedMedia:
        presigned = await self._media.get_presigned_upload_url(
            world_id=world_id, character_id=character_id, filename=filename, content_type=image.content_type,
            size=len(image.data), media_type=media_type, call=call,
        )
        started = time.monotonic()
        error: str | None = None
        status: int | None = None
        try:
            resp = await self._http.put(presigned.upload_url, content=image.data,
                                        headers={"Content-Type": image.content_type})
            status = resp.status_code
            if status not in (200, 201, 204):
                error = f"upload of {filename} answered HTTP {status}"
        except httpx.HTTPError as exc:
            error = f"upload of {filename} failed: {type(exc).__name__}: {exc}"
        if self._recorder is not None:
            await self._recorder.record(ApiRequestRecord(
                api_type="upload", task_id=call.task_id, world_id=call.world_id, request_type=call.request_type,
                request_data={"media_id": presigned.media_id, "filename": filename, "bytes": len(image.data),
                              "content_type": image.content_type},
                response_data=None if error else {"status_code": status}, error=error,
                error_type="upload_failed" if error else None, status="error" if error else "ok",
                status_code=status, duration_ms=int((time.monotonic() - started) * 1000),
                task_attempt=call.attempt,
            ))
        if error:
            raise UploadFailed(error)
        confirmed = await self._media.confirm_upload(presigned.media_id, call=call)
        if not confirmed.success:
            raise UploadFailed(f"media {presigned.media_id} was not confirmed")
        url = confirmed.variants[0].url if confirmed.variants else ""
        return UploadedMedia(media_id=str(presigned.media_id), url=url)
