"""The gRPC clients against a scripted in-process grpc.aio server on a real socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import pytest
from fakes import MemoryRecorder

from ai_worker.errors import PlatformRejected, PlatformUnavailable
from ai_worker.platform import MediaKind, PlatformClients, ServiceResolver
from ai_worker.platform.generated import character_pb2, media_pb2, post_pb2, world_pb2
from ai_worker.providers.history import CallContext

Handler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


class Scripted:
    """A grpc.aio server whose methods are set per test; it keeps the requests it received."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}
        self.requests: dict[str, list[Any]] = {}
        self.server = grpc.aio.server()
        self.port = 0

    def _generic(self, service: str, methods: dict[str, Callable[[bytes], Any]]) -> Any:
        def make(method: str, parse: Callable[[bytes], Any]) -> grpc.RpcMethodHandler[Any, Any]:
            async def behaviour(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                self.requests.setdefault(method, []).append(request)
                return await self.handlers[method](request, context)

            return grpc.unary_unary_rpc_method_handler(
                behaviour, request_deserializer=parse, response_serializer=lambda m: m.SerializeToString()
            )

        return grpc.method_handlers_generic_handler(service, {m: make(m, p) for m, p in methods.items()})

    async def start(self) -> None:
        self.server.add_generic_rpc_handlers(
            [
                self._generic(
                    "generia.character.CharacterService",
                    {
                        "CreateCharacter": character_pb2.CreateCharacterRequest.FromString,
                        "GetCharacter": character_pb2.GetCharacterRequest.FromString,
                    },
                ),
                self._generic(
                    "media.MediaService",
                    {"GetPresignedUploadURL": media_pb2.GetPresignedUploadURLRequest.FromString},
                ),
                self._generic("post.PostService", {"CreateAIPost": post_pb2.CreateAIPostRequest.FromString}),
                self._generic(
                    "world.WorldService", {"UpdateWorldParams": world_pb2.UpdateWorldParamsRequest.FromString}
                ),
            ]
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class CountingResolver(ServiceResolver):
    def __init__(self, address: str) -> None:
        names = ("character-service", "media-service", "post-service", "world-service")
        super().__init__("127.0.0.1:1", {n: address for n in names}, cache_s=30)
        self.invalidated: list[str] = []

    def invalidate(self, name: str) -> None:
        self.invalidated.append(name)
        super().invalidate(name)


@pytest.fixture
async def server() -> AsyncIterator[Scripted]:
    scripted = Scripted()
    await scripted.start()
    yield scripted
    await scripted.server.stop(None)


def _clients(
    server: Scripted, recorder: MemoryRecorder | None = None, deadline_s: float = 2.0
) -> PlatformClients:
    return PlatformClients(
        resolver=CountingResolver(server.address), deadline_s=deadline_s, recorder=recorder
    )


async def test_create_character_sends_fields_and_returns_dataclass(server: Scripted) -> None:
    async def create(req: Any, ctx: Any) -> character_pb2.Character:
        return character_pb2.Character(
            id="c1", world_id=req.world_id, is_ai=True, display_name=req.display_name, meta=req.meta
        )

    server.handlers["CreateCharacter"] = create
    recorder = MemoryRecorder()
    clients = _clients(server, recorder)
    try:
        info = await clients.characters.create_character(
            world_id="w1",
            display_name="Ada",
            meta='{"bio": "x"}',
            request_id="r-1",
            call=CallContext(task_id="t1", world_id="w1", request_type="create_character"),
        )
    finally:
        await clients.close()
    assert info.id == "c1" and info.is_ai and info.meta == '{"bio": "x"}'
    assert info.avatar_media_id is None and info.avatar_url == ""
    sent = server.requests["CreateCharacter"][0]
    assert sent.request_id == "r-1"
    assert not sent.HasField("real_user_id") and not sent.HasField("avatar_media_id")
    [record] = recorder.records
    assert record.api_type == "grpc" and record.task_id == "t1" and record.status == "ok"
    assert record.request_data["method"] == "CreateCharacter"
    assert record.response_data == {"id": "c1", "is_ai": True}
    assert record.cost == 0 and record.total_tokens == 0


async def test_unavailable_is_retryable_and_invalidates(server: Scripted) -> None:
    async def down(req: Any, ctx: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await ctx.abort(grpc.StatusCode.UNAVAILABLE, "going away")

    server.handlers["CreateAIPost"] = down
    recorder = MemoryRecorder()
    clients = _clients(server, recorder)
    try:
        with pytest.raises(PlatformUnavailable, match="UNAVAILABLE") as info:
            await clients.posts.create_ai_post(
                character_id="c",
                caption="hi",
                media_id="",
                world_id="w",
                tags=["a"],
                call=CallContext(task_id="t", world_id="w", request_type="post"),
            )
        assert info.value.retryable
        assert isinstance(clients.resolver, CountingResolver)
        assert clients.resolver.invalidated == ["post-service"]
    finally:
        await clients.close()
    [record] = recorder.records
    assert record.status == "error" and record.error_type == "platform_unavailable"
    assert record.status_code == grpc.StatusCode.UNAVAILABLE.value[0]


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, PlatformUnavailable),
        (grpc.StatusCode.NOT_FOUND, PlatformRejected),
        (grpc.StatusCode.INVALID_ARGUMENT, PlatformRejected),
        (grpc.StatusCode.INTERNAL, PlatformRejected),
    ],
)
async def test_status_mapping(server: Scripted, code: grpc.StatusCode, error: type[Exception]) -> None:
    async def fail(req: Any, ctx: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await ctx.abort(code, "details here")

    server.handlers["GetCharacter"] = fail
    clients = _clients(server)
    try:
        with pytest.raises(error, match=f"{code.name}: details here"):
            await clients.characters.get_character("c1")
    finally:
        await clients.close()


async def test_deadline_is_applied(server: Scripted) -> None:
    async def slow(req: Any, ctx: Any) -> character_pb2.Character:
        await asyncio.sleep(2)
        return character_pb2.Character(id="late")

    server.handlers["GetCharacter"] = slow
    clients = _clients(server, deadline_s=0.2)
    try:
        with pytest.raises(PlatformUnavailable, match="DEADLINE_EXCEEDED"):
            await clients.characters.get_character("c1")
    finally:
        await clients.close()


async def test_success_false_is_rejected(server: Scripted) -> None:
    async def refuse(req: Any, ctx: Any) -> world_pb2.UpdateWorldParamsResponse:
        return world_pb2.UpdateWorldParamsResponse(success=False, message="nope")

    server.handlers["UpdateWorldParams"] = refuse
    clients = _clients(server)
    try:
        with pytest.raises(PlatformRejected, match="nope"):
            await clients.worlds.update_world_params(
                world_id="w", params_json="{}", name="W", users_count=3, posts_count=9
            )
    finally:
        await clients.close()
    sent = server.requests["UpdateWorldParams"][0]
    assert (sent.users_count, sent.posts_count, sent.params) == (3, 9, "{}")


async def test_presigned_url_media_kind(server: Scripted) -> None:
    async def presign(req: Any, ctx: Any) -> media_pb2.GetPresignedUploadURLResponse:
        return media_pb2.GetPresignedUploadURLResponse(media_id="m1", upload_url="http://x/u", expires_at=42)

    server.handlers["GetPresignedUploadURL"] = presign
    clients = _clients(server)
    try:
        upload = await clients.media.get_presigned_upload_url(
            world_id="w",
            character_id="",
            filename="world_w_icon.png",
            content_type="image/png",
            size=10,
            media_type=MediaKind.WORLD_ICON,
        )
    finally:
        await clients.close()
    assert (upload.media_id, upload.upload_url, upload.expires_at) == ("m1", "http://x/u", 42)
    assert server.requests["GetPresignedUploadURL"][0].media_type == media_pb2.MEDIA_TYPE_WORLD_ICON


async def test_from_settings_uses_static_addresses() -> None:
    from ai_worker.config import Settings

    settings = Settings(
        MONGODB_URI="mongodb://x",
        KAFKA_BROKERS="k:9092",
        CHARACTER_SERVICE_ADDR="127.0.0.1:1111",
        GRPC_DEADLINE_S=3,
    )
    clients = PlatformClients.from_settings(settings, None)
    try:
        assert await clients.resolver.resolve("character-service") == "127.0.0.1:1111"
        assert clients.resolver.static_address("media-service") is None
    finally:
        await clients.close()


class DiscoveredResolver(CountingResolver):
    """Behaves like a Consul-backed resolver (no static address) that always answers `address`."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.address = address
        self.resolves = 0

    def static_address(self, name: str) -> str | None:
        return None

    async def resolve(self, name: str) -> str:
        self.resolves += 1
        return self.address


async def test_unavailable_drops_the_channel_of_a_discovered_address(server: Scripted) -> None:
    calls = 0

    async def flaky(req: Any, ctx: grpc.aio.ServicerContext[Any, Any]) -> character_pb2.Character:
        nonlocal calls
        calls += 1
        if calls == 1:
            await ctx.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        return character_pb2.Character(id="c9", is_ai=True)

    server.handlers["GetCharacter"] = flaky
    resolver = DiscoveredResolver(server.address)
    clients = PlatformClients(resolver=resolver, deadline_s=2.0)
    try:
        with pytest.raises(PlatformUnavailable):
            await clients.characters.get_character("c9")
        assert resolver.invalidated == ["character-service"]
        assert clients.characters._channels == {}
        assert (await clients.characters.get_character("c9")).id == "c9"
        assert resolver.resolves == 2
        assert list(clients.characters._channels) == [server.address]
    finally:
        await clients.close()
