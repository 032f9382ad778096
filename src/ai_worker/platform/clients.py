"""Typed grpc.aio clients for the platform's character, media, post and world services.

Every call carries a deadline. Results cross the boundary as dataclasses, never protobuf objects.
Errors: UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED become `PlatformUnavailable`
(retryable; UNAVAILABLE also makes the next call re-resolve the address); every other status, and a
response with success=false, becomes `PlatformRejected`. When a `CallContext` is passed, one
`api_requests_history` document (api_type "grpc") is recorded per call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import grpc
import grpc.aio

from ai_worker.errors import PlatformRejected, PlatformUnavailable, WorkerError
from ai_worker.observability.metrics import observe_grpc
from ai_worker.platform.discovery import (
    CHARACTER_SERVICE,
    MEDIA_SERVICE,
    POST_SERVICE,
    WORLD_SERVICE,
    ServiceResolver,
)
from ai_worker.platform.generated import character_pb2, media_pb2, post_pb2, world_pb2
from ai_worker.providers.history import ApiRequestRecord, CallContext, Recorder

if TYPE_CHECKING:
    from ai_worker.config import Settings

log = logging.getLogger(__name__)

RETRYABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)


class _Message(Protocol):
    def SerializeToString(self, *, deterministic: bool = ...) -> bytes: ...


Resp = TypeVar("Resp")


# --- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CharacterInfo:
    id: str
    world_id: str
    display_name: str
    is_ai: bool
    avatar_media_id: str | None
    avatar_url: str
    meta: str | None
    real_user_id: str | None = None
    created_at: str = ""


class MediaKind(IntEnum):
    """Mirror of the proto enum `media.MediaType` (0 = unknown is never sent)."""

    WORLD_HEADER = 1
    WORLD_ICON = 2
    CHARACTER_AVATAR = 3
    POST_IMAGE = 4


@dataclass(frozen=True)
class PresignedUpload:
    media_id: str
    upload_url: str
    expires_at: int


@dataclass(frozen=True)
class MediaVariantInfo:
    name: str
    url: str
    width: int
    height: int


@dataclass(frozen=True)
class ConfirmedMedia:
    success: bool
    variants: list[MediaVariantInfo] = field(default_factory=list)


def map_rpc_error(exc: grpc.aio.AioRpcError, what: str) -> WorkerError:
    """The worker's error for a failed call; `what` names the call in the message."""
    code = exc.code()
    message = f"{what} failed: {code.name}: {exc.details() or ''}".rstrip(": ")
    if code in RETRYABLE_CODES:
        return PlatformUnavailable(message)
    return PlatformRejected(message)


def _status_number(code: grpc.StatusCode) -> int:
    value = code.value
    return int(value[0]) if isinstance(value, tuple) else int(value)


# --- the shared machinery -----------------------------------------------------------------------


class _ServiceClient:
    """One platform service: resolves its address, keeps one channel per address, makes calls.
    Subclasses name the service (`service`: its Consul name; `grpc_service`: package.Service)."""

    service: str
    grpc_service: str

    def __init__(self, resolver: ServiceResolver, deadline_s: float, recorder: Recorder | None = None) -> None:
        self._service = self.service
        self._grpc_service = self.grpc_service
        self._resolver = resolver
        self._deadline_s = deadline_s
        self._recorder = recorder
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address)
            self._channels[address] = channel
        return channel

    def _drop_channel(self, address: str) -> None:
        channel = self._channels.pop(address, None)
        if channel is None:
            return
        # Let calls still running on it finish (up to one deadline), then close.
        task = asyncio.get_running_loop().create_task(channel.close(self._deadline_s))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close(None)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def _call(
        self,
        method: str,
        request: _Message,
        deserialize: Callable[[bytes], Resp],
        *,
        call: CallContext | None,
        request_data: dict[str, Any],
        summarize: Callable[[Resp], dict[str, Any]] | None = None,
    ) -> Resp:
        """Unary call `method` of this service; returns the response message (typed by the caller)."""
        what = f"{self._service} {method}"
        started = time.monotonic()
        address: str | None = None
        try:
            address = await self._resolver.resolve(self._service)
            multicallable = self._channel(address).unary_unary(
                f"/{self._grpc_service}/{method}",
                request_serializer=_serialize,
                response_deserializer=deserialize,
            )
            response = cast(Resp, await multicallable(request, timeout=self._deadline_s))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self._resolver.invalidate(self._service)
                if address is not None and self._resolver.static_address(self._service) is None:
                    self._drop_channel(address)
            error = map_rpc_error(exc, what)
            await self._record(
                call, method, request_data, started, error=error, status_code=_status_number(exc.code())
            )
            raise error from exc
        except WorkerError as error:
            await self._record(call, method, request_data, started, error=error)
            raise
        response_data = summarize(response) if summarize is not None else None
        await self._record(call, method, request_data, started, response_data=response_data)
        return response

    async def _record(
        self,
        call: CallContext | None,
        method: str,
        request_data: dict[str, Any],
        started: float,
        *,
        response_data: dict[str, Any] | None = None,
        error: WorkerError | None = None,
        status_code: int | None = None,
    ) -> None:
        observe_grpc(self._service, method, started, status_code=status_code, failed=error is not None)
        if call is None or self._recorder is None:
            return
        record = ApiRequestRecord(
            api_type="grpc",
            task_id=call.task_id,
            world_id=call.world_id,
            request_type=call.request_type,
            request_data={"service": self._service, "method": method, **request_data},
            response_data=response_data,
            error=str(error) if error is not None else None,
            error_type=error.error_type if error is not None else None,
            status="error" if error is not None else "ok",
            status_code=status_code if error is not None else 0,
            duration_ms=int((time.monotonic() - started) * 1000),
            provider="platform",
            task_attempt=call.attempt,
        )
        try:
            await self._recorder.record(record)
        except Exception:  # history is best effort: never fail the platform call because of it
            log.warning("could not record %s %s in the history", self._service, method, exc_info=True)


def _serialize(message: _Message) -> bytes:
    return message.SerializeToString()


def _character_info(msg: character_pb2.Character) -> CharacterInfo:
    return CharacterInfo(
        id=msg.id,
        world_id=msg.world_id,
        display_name=msg.display_name,
        is_ai=msg.is_ai,
        avatar_media_id=msg.avatar_media_id if msg.HasField("avatar_media_id") else None,
        avatar_url=msg.avatar_url,
        meta=msg.meta if msg.HasField("meta") else None,
        real_user_id=msg.real_user_id if msg.HasField("real_user_id") else None,
        created_at=msg.created_at,
    )


def _character_summary(msg: character_pb2.Character) -> dict[str, Any]:
    return {"id": msg.id, "is_ai": msg.is_ai}


class _Outcome(Protocol):
    success: bool
    message: str


def _outcome(response: _Outcome) -> dict[str, Any]:
    return {"success": response.success, "message": response.message}


def _require_success(method: str, response: _Outcome) -> None:
    """The World service answers success=false (not a gRPC error) when it refuses an update."""
    if not response.success:
        raise PlatformRejected(f"{WORLD_SERVICE} {method} refused: {response.message}")


def _drop_none(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


# --- the four clients ---------------------------------------------------------------------------


class CharacterClient(_ServiceClient):
    service = CHARACTER_SERVICE
    grpc_service = "generia.character.CharacterService"

    async def create_character(
        self,
        *,
        world_id: str,
        display_name: str,
        meta: str | None = None,
        avatar_media_id: str | None = None,
        request_id: str | None = None,
        call: CallContext | None = None,
    ) -> CharacterInfo:
        """Creates an AI character (no real_user_id). `request_id` is an idempotency key."""
        fields = _drop_none(
            world_id=world_id,
            display_name=display_name,
            meta=meta,
            avatar_media_id=avatar_media_id,
            request_id=request_id,
        )
        request = character_pb2.CreateCharacterRequest(**fields)
        response: character_pb2.Character = await self._call(
            "CreateCharacter",
            request,
            character_pb2.Character.FromString,
            call=call,
            request_data=fields,
            summarize=_character_summary,
        )
        return _character_info(response)

    async def update_character(
        self,
        *,
        character_id: str,
        display_name: str | None = None,
        avatar_media_id: str | None = None,
        avatar_url: str | None = None,
        meta: str | None = None,
        call: CallContext | None = None,
    ) -> CharacterInfo:
        fields = _drop_none(
            character_id=character_id,
            display_name=display_name,
            avatar_media_id=avatar_media_id,
            avatar_url=avatar_url,
            meta=meta,
        )
        request = character_pb2.UpdateCharacterRequest(**fields)
        response: character_pb2.Character = await self._call(
            "UpdateCharacter",
            request,
            character_pb2.Character.FromString,
            call=call,
            request_data=fields,
            summarize=_character_summary,
        )
        return _character_info(response)

    async def get_character(self, character_id: str, *, call: CallContext | None = None) -> CharacterInfo:
        request = character_pb2.GetCharacterRequest(character_id=character_id)
        response: character_pb2.Character = await self._call(
            "GetCharacter",
            request,
            character_pb2.Character.FromString,
            call=call,
            request_data={"character_id": character_id},
            summarize=_character_summary,
        )
        return _character_info(response)

    async def list_characters_in_world(
        self, world_id: str, *, user_id: str = "", call: CallContext | None = None
    ) -> list[CharacterInfo]:
        """`GetUserCharactersInWorld`: the characters of `user_id` in a world. An empty `user_id` (the
        default) asks for the world's AI characters, whose `real_user_id` is empty (CONTRACTS.md)."""
        request = character_pb2.GetUserCharactersInWorldRequest(user_id=user_id, world_id=world_id)
        response: character_pb2.CharacterList = await self._call(
            "GetUserCharactersInWorld",
            request,
            character_pb2.CharacterList.FromString,
            call=call,
            request_data={"world_id": world_id, "user_id": user_id},
            summarize=lambda r: {"characters": len(r.characters)},
        )
        return [_character_info(c) for c in response.characters]

    async def health_check(self) -> str:
        response: character_pb2.HealthCheckResponse = await self._call(
            "HealthCheck",
            character_pb2.HealthCheckRequest(),
            character_pb2.HealthCheckResponse.FromString,
            call=None,
            request_data={},
        )
        return response.status


class MediaClient(_ServiceClient):
    service = MEDIA_SERVICE
    grpc_service = "media.MediaService"

    async def get_presigned_upload_url(
        self,
        *,
        world_id: str,
        character_id: str,
        filename: str,
        content_type: str,
        size: int,
        media_type: MediaKind,
        call: CallContext | None = None,
    ) -> PresignedUpload:
        """`character_id` is "" for world images."""
        request = media_pb2.GetPresignedUploadURLRequest(
            world_id=world_id,
            character_id=character_id,
            filename=filename,
            content_type=content_type,
            size=size,
            media_type=f"MEDIA_TYPE_{MediaKind(media_type).name}",
        )
        response: media_pb2.GetPresignedUploadURLResponse = await self._call(
            "GetPresignedUploadURL",
            request,
            media_pb2.GetPresignedUploadURLResponse.FromString,
            call=call,
            request_data={
                "world_id": world_id,
                "character_id": character_id,
                "filename": filename,
                "content_type": content_type,
                "size": size,
                "media_type": MediaKind(media_type).name,
            },
            # The upload URL carries a signature: record only the media id.
            summarize=lambda r: {"media_id": r.media_id, "expires_at": r.expires_at},
        )
        return PresignedUpload(
            media_id=response.media_id, upload_url=response.upload_url, expires_at=response.expires_at
        )

    async def confirm_upload(self, media_id: str, *, call: CallContext | None = None) -> ConfirmedMedia:
        response: media_pb2.ConfirmUploadResponse = await self._call(
            "ConfirmUpload",
            media_pb2.ConfirmUploadRequest(media_id=media_id),
            media_pb2.ConfirmUploadResponse.FromString,
            call=call,
            request_data={"media_id": media_id},
            summarize=lambda r: {"success": r.success, "variants": len(r.variants)},
        )
        return ConfirmedMedia(
            success=response.success,
            variants=[
                MediaVariantInfo(name=v.name, url=v.url, width=v.width, height=v.height)
                for v in response.variants
            ],
        )


class PostClient(_ServiceClient):
    service = POST_SERVICE
    grpc_service = "post.PostService"

    async def create_ai_post(
        self,
        *,
        character_id: str,
        caption: str,
        media_id: str,
        world_id: str,
        tags: list[str],
        request_id: str | None = None,
        call: CallContext | None = None,
    ) -> str:
        """Returns the post id. `request_id` is an idempotency key."""
        fields = _drop_none(
            character_id=character_id,
            caption=caption,
            media_id=media_id,
            world_id=world_id,
            tags=list(tags),
            request_id=request_id,
        )
        response: post_pb2.CreatePostResponse = await self._call(
            "CreateAIPost",
            post_pb2.CreateAIPostRequest(**fields),
            post_pb2.CreatePostResponse.FromString,
            call=call,
            request_data=fields,
            summarize=lambda r: {"post_id": r.post_id, "created_at": r.created_at},
        )
        return response.post_id


class WorldClient(_ServiceClient):
    service = WORLD_SERVICE
    grpc_service = "world.WorldService"

    async def update_world_image(
        self, *, world_id: str, image_uuid: str, icon_uuid: str, call: CallContext | None = None
    ) -> None:
        fields = {"world_id": world_id, "image_uuid": image_uuid, "icon_uuid": icon_uuid}
        response: world_pb2.UpdateWorldImageResponse = await self._call(
            "UpdateWorldImage",
            world_pb2.UpdateWorldImageRequest(**fields),
            world_pb2.UpdateWorldImageResponse.FromString,
            call=call,
            request_data=fields,
            summarize=_outcome,
        )
        _require_success("UpdateWorldImage", response)

    async def update_world_params(
        self,
        *,
        world_id: str,
        params_json: str,
        name: str,
        users_count: int,
        posts_count: int,
        call: CallContext | None = None,
    ) -> None:
        response: world_pb2.UpdateWorldParamsResponse = await self._call(
            "UpdateWorldParams",
            world_pb2.UpdateWorldParamsRequest(
                world_id=world_id,
                params=params_json,
                name=name,
                users_count=users_count,
                posts_count=posts_count,
            ),
            world_pb2.UpdateWorldParamsResponse.FromString,
            call=call,
            request_data={
                "world_id": world_id,
                "name": name,
                "users_count": users_count,
                "posts_count": posts_count,
                "params_chars": len(params_json),
            },
            summarize=_outcome,
        )
        _require_success("UpdateWorldParams", response)

    async def get_world(
        self, world_id: str, *, user_id: str = "", call: CallContext | None = None
    ) -> dict[str, Any]:
        r: world_pb2.WorldResponse = await self._call(
            "GetWorld",
            world_pb2.GetWorldRequest(world_id=world_id, user_id=user_id),
            world_pb2.WorldResponse.FromString,
            call=call,
            request_data={"world_id": world_id, "user_id": user_id},
            summarize=lambda r: {"id": r.id},
        )
        return {
            "id": r.id,
            "name": r.name,
            "description": r.description,
            "prompt": r.prompt,
            "creator_id": r.creator_id,
            "generation_status": r.generation_status,
            "status": r.status,
            "users_count": r.users_count,
            "posts_count": r.posts_count,
            "created_at": r.created_at,
            "updated_at": r.updated_at,
            "is_joined": r.is_joined,
            "image_url": r.image_url,
            "icon_url": r.icon_url,
            "params": r.params if r.HasField("params") else None,
        }


# --- the bundle ---------------------------------------------------------------------------------


class PlatformClients:
    """The four clients sharing one resolver."""

    def __init__(
        self,
        *,
        resolver: ServiceResolver,
        deadline_s: float,
        recorder: Recorder | None = None,
    ) -> None:
        self.resolver = resolver
        self.characters = CharacterClient(resolver, deadline_s, recorder)
        self.media = MediaClient(resolver, deadline_s, recorder)
        self.posts = PostClient(resolver, deadline_s, recorder)
        self.worlds = WorldClient(resolver, deadline_s, recorder)

    @classmethod
    def from_settings(cls, settings: Settings, recorder: Recorder | None = None) -> PlatformClients:
        resolver = ServiceResolver(
            settings.consul_address,
            {
                CHARACTER_SERVICE: settings.character_service_addr,
                MEDIA_SERVICE: settings.media_service_addr,
                POST_SERVICE: settings.post_service_addr,
                WORLD_SERVICE: settings.world_service_addr,
            },
            settings.consul_cache_s,
        )
        return cls(resolver=resolver, deadline_s=settings.grpc_deadline_s, recorder=recorder)

    async def close(self) -> None:
        for client in (self.characters, self.media, self.posts, self.worlds):
            await client.close()
        await self.resolver.close()
