"""A local stand-in for the Generia platform: the four gRPC services plus the presigned-upload HTTP
endpoint, backed by MongoDB (database `generia_platform`: worlds, characters, posts, media).

It follows the wire contract in CONTRACTS.md and is stricter than it needs to be where that catches
worker bugs: uploads are checked against the presigned URL's signature, expiry and content type, media
must be uploaded before it is confirmed and confirmed before it is used. A post may be created without
media (empty media_id).

Two modes for the `request_id` idempotency key we added to CreateCharacter and CreateAIPost:
- `honour_request_id=True` (the default, "local" mode): a repeated id returns the object created the first
  time, and the stored object's `create_calls` counts the calls that carried its id;
- `honour_request_id=False` ("real" mode, `ai-worker platform --ignore-request-id`): like the platform's own
  services, which ignore the field, every create call creates a new object. The request_id is still stored on
  it (`create_calls` is 1), so a test can count the objects made per planned item: what the real platform
  would hold after the same run.
Every presigned upload URL handed out makes one `media` document (in both modes: the Media service has no
idempotency key), so media per file name count the upload attempts per planned image.

`fail_next(method, code, times)` makes the next calls of a method abort with a status, for tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import logging
import random
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
from aiohttp import web
from PIL import Image, UnidentifiedImageError
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConnectionFailure, DuplicateKeyError

from ai_worker.platform.generated import character_pb2, media_pb2, post_pb2, world_pb2

log = logging.getLogger(__name__)

UPLOAD_TTL_S = 600
MAX_UPLOAD_BYTES = 32 * 1024 * 1024

Doc = dict[str, Any]
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext[Any, Any]


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        moment: datetime = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return moment.isoformat()
    return "" if value is None else str(value)


def _safe_filename(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._-]", "_", base)[:120] or "file"


class LocalPlatform:
    """The four platform services on one gRPC server, and the upload/media HTTP server."""

    def __init__(
        self,
        *,
        mongo_uri: str,
        data_dir: Path,
        host: str = "127.0.0.1",
        grpc_port: int = 0,
        http_port: int = 0,
        database: str = "generia_platform",
        public_url: str | None = None,
        honour_request_id: bool = True,
    ) -> None:
        self.honour_request_id = honour_request_id
        self._public_url = public_url.rstrip("/") if public_url else None
        self._mongo_uri = mongo_uri
        self._data_dir = Path(data_dir)
        self._host = host
        self._grpc_port_wanted = grpc_port
        self._http_port_wanted = http_port
        self._database_name = database
        self._secret = secrets.token_bytes(32)
        self._faults: dict[str, tuple[grpc.StatusCode, int]] = {}
        self._hangs: dict[str, float] = {}
        self._hang_first: set[str] = set()
        self._hang_rng = random.Random(0)
        self.hung = 0
        self._client: AsyncMongoClient[Doc] | None = None
        self._db: AsyncDatabase[Doc] | None = None
        self._server: grpc.aio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._grpc_port = 0
        self._http_port = 0

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def grpc_address(self) -> str:
        if not self._grpc_port:
            raise RuntimeError("LocalPlatform is not started")
        return f"{self._host}:{self._grpc_port}"

    @property
    def upload_base_url(self) -> str:
        if not self._http_port:
            raise RuntimeError("LocalPlatform is not started")
        if self._public_url:
            return self._public_url
        return f"http://{self._host}:{self._http_port}"

    @property
    def database(self) -> AsyncDatabase[Doc]:
        if self._db is None:
            raise RuntimeError("LocalPlatform is not started")
        return self._db

    async def start(self) -> None:
        (self._data_dir / "media").mkdir(parents=True, exist_ok=True)
        self._client = AsyncMongoClient(self._mongo_uri, tz_aware=True)
        self._db = self._client[self._database_name]
        for name in ("characters", "posts"):
            if self.honour_request_id:
                await self._db[name].create_index(
                    "request_id", unique=True, partialFilterExpression={"request_id": {"$type": "string"}}
                )
            else:
                await self._drop_unique_request_id_index(self._db[name])
        await self._db["media"].create_index([("world_id", 1), ("filename", 1)])
        await self._db["characters"].create_index([("world_id", 1), ("real_user_id", 1)])

        app = web.Application(client_max_size=MAX_UPLOAD_BYTES)
        app.router.add_put("/upload/{media_id}", self._http_upload)
        app.router.add_get("/media/{media_id}", self._http_media)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._http_port_wanted)
        await site.start()
        self._http_port = int(self._runner.addresses[0][1])

        server = grpc.aio.server()
        server.add_generic_rpc_handlers(self._handlers())
        self._grpc_port = server.add_insecure_port(f"{self._host}:{self._grpc_port_wanted}")
        await server.start()
        self._server = server
        log.info("local platform: gRPC %s, HTTP %s", self.grpc_address, self.upload_base_url)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace=1.0)
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        client, self._client = self._client, None
        if client is not None:
            await client.close()
        self._db = None

    @staticmethod
    async def _drop_unique_request_id_index(col: AsyncCollection[Doc]) -> None:
        """Real mode stores repeated request ids: an index left by a local-mode run on the same database
        would refuse them."""
        async for index in await col.list_indexes():
            if index.get("unique") and dict(index.get("key", {})) == {"request_id": 1}:
                log.warning("local platform (real mode): dropping the unique request_id index of %s", col.name)
                await col.drop_index(index["name"])

    async def __aenter__(self) -> LocalPlatform:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- test helpers --------------------------------------------------------------------------

    def fail_next(self, method: str, code: grpc.StatusCode, times: int = 1) -> None:
        """The next `times` calls of `method` ("CreateCharacter" or its full path) abort with `code`."""
        name = method.rsplit("/", 1)[-1]
        if times <= 0:
            self._faults.pop(name, None)
        else:
            self._faults[name] = (code, times)

    def hang(self, method: str, rate: float) -> None:
        """A fraction `rate` of the calls of `method` never answer (until the caller gives up): a stuck
        server. The first call after this always hangs (so a short test sees one). `rate` 0 turns it off."""
        name = method.rsplit("/", 1)[-1]
        if rate <= 0:
            self._hangs.pop(name, None)
            self._hang_first.discard(name)
        else:
            self._hangs[name] = rate
            self._hang_first.add(name)

    async def seed_world(
        self,
        world_id: str,
        *,
        name: str = "",
        prompt: str = "",
        description: str = "",
        creator_id: str = "",
    ) -> None:
        """Creates the world document the platform would have before the worker runs (if missing)."""
        now = _now()
        await self._col("worlds").update_one(
            {"_id": world_id},
            {
                "$setOnInsert": {
                    "name": name,
                    "prompt": prompt,
                    "description": description,
                    "creator_id": creator_id,
                    "status": "active",
                    "generation_status": "pending",
                    "users_count": 0,
                    "posts_count": 0,
                    "created_at": now,
                    "updated_at": now,
                }
            },
            upsert=True,
        )

    # --- plumbing ------------------------------------------------------------------------------

    def _col(self, name: str) -> AsyncCollection[Doc]:
        return self.database[name]

    def _handlers(self) -> list[grpc.GenericRpcHandler[Any, Any]]:
        def unary(
            method: str,
            fn: Callable[[Req, Context], Awaitable[Resp]],
            parse: Callable[[bytes], Req],
        ) -> grpc.RpcMethodHandler[Any, Any]:
            async def behaviour(request: Req, context: Context) -> Resp:
                first = method in self._hang_first
                self._hang_first.discard(method)
                if first or self._hang_rng.random() < self._hangs.get(method, 0.0):
                    self.hung += 1
                    await asyncio.sleep(3600)  # cancelled when the caller's deadline passes or it hangs up
                fault = self._faults.get(method)
                if fault is not None:
                    code, left = fault
                    if left <= 1:
                        self._faults.pop(method, None)
                    else:
                        self._faults[method] = (code, left - 1)
                    await context.abort(code, f"injected fault on {method}")
                try:
                    return await fn(request, context)
                except ConnectionFailure as exc:  # a database outage is the platform being unavailable
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"database unavailable: {exc}")
                    raise  # abort() raises; this keeps the type checker informed

            return grpc.unary_unary_rpc_method_handler(
                behaviour,
                request_deserializer=parse,
                response_serializer=lambda message: message.SerializeToString(),
            )

        return [
            grpc.method_handlers_generic_handler(
                "generia.character.CharacterService",
                {
                    "CreateCharacter": unary(
                        "CreateCharacter",
                        self._create_character,
                        character_pb2.CreateCharacterRequest.FromString,
                    ),
                    "UpdateCharacter": unary(
                        "UpdateCharacter",
                        self._update_character,
                        character_pb2.UpdateCharacterRequest.FromString,
                    ),
                    "GetCharacter": unary(
                        "GetCharacter", self._get_character, character_pb2.GetCharacterRequest.FromString
                    ),
                    "GetUserCharactersInWorld": unary(
                        "GetUserCharactersInWorld",
                        self._user_characters,
                        character_pb2.GetUserCharactersInWorldRequest.FromString,
                    ),
                    "HealthCheck": unary(
                        "HealthCheck", self._health_check, character_pb2.HealthCheckRequest.FromString
                    ),
                },
            ),
            grpc.method_handlers_generic_handler(
                "media.MediaService",
                {
                    "GetPresignedUploadURL": unary(
                        "GetPresignedUploadURL",
                        self._presigned_url,
                        media_pb2.GetPresignedUploadURLRequest.FromString,
                    ),
                    "ConfirmUpload": unary(
                        "ConfirmUpload", self._confirm_upload, media_pb2.ConfirmUploadRequest.FromString
                    ),
                },
            ),
            grpc.method_handlers_generic_handler(
                "post.PostService",
                {
                    "CreateAIPost": unary(
                        "CreateAIPost", self._create_ai_post, post_pb2.CreateAIPostRequest.FromString
                    ),
                },
            ),
            grpc.method_handlers_generic_handler(
                "world.WorldService",
                {
                    "UpdateWorldImage": unary(
                        "UpdateWorldImage",
                        self._update_world_image,
                        world_pb2.UpdateWorldImageRequest.FromString,
                    ),
                    "UpdateWorldParams": unary(
                        "UpdateWorldParams",
                        self._update_world_params,
                        world_pb2.UpdateWorldParamsRequest.FromString,
                    ),
                    "GetWorld": unary("GetWorld", self._get_world, world_pb2.GetWorldRequest.FromString),
                },
            ),
        ]

    async def _insert_once(self, collection: str, doc: Doc, *, looked_up: bool = False) -> Doc:
        """Inserts `doc`, or (local mode) returns the document already stored under its request_id after
        counting the call on it (`looked_up`: the caller already looked for it)."""
        col = self._col(collection)
        request_id = doc.get("request_id")
        doc["create_calls"] = 1
        if request_id is None or not self.honour_request_id:
            await col.insert_one(doc)
            return doc
        if not looked_up:
            existing = await self._count_repeat(col, request_id)
            if existing is not None:
                return existing
        try:
            await col.insert_one(doc)
        except DuplicateKeyError:
            existing = await self._count_repeat(col, request_id)
            if existing is None:
                raise
            return existing
        return doc

    @staticmethod
    async def _count_repeat(col: AsyncCollection[Doc], request_id: str) -> Doc | None:
        # Read, then count by `_id`: a find-and-modify scans the collection on the embedded database.
        found: Doc | None = await col.find_one({"request_id": request_id})
        if found is not None:
            await col.update_one({"_id": found["_id"]}, {"$inc": {"create_calls": 1}})
        return found

    async def _confirmed_media(self, media_id: str, context: Context) -> Doc:
        media = await self._col("media").find_one({"_id": media_id})
        if media is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"media {media_id} not found")
        if media.get("status") != "confirmed":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"media {media_id} is {media.get('status')}, not confirmed",
            )
        return media

    # --- CharacterService ----------------------------------------------------------------------

    @staticmethod
    def _character_message(doc: Doc) -> character_pb2.Character:
        msg = character_pb2.Character(
            id=str(doc["_id"]),
            world_id=doc.get("world_id", ""),
            is_ai=bool(doc.get("is_ai", True)),
            display_name=doc.get("display_name", ""),
            avatar_url=doc.get("avatar_url") or "",
            created_at=_iso(doc.get("created_at")),
        )
        for name in ("real_user_id", "avatar_media_id", "meta"):
            if doc.get(name) is not None:
                setattr(msg, name, doc[name])
        return msg

    async def _create_character(
        self, request: character_pb2.CreateCharacterRequest, context: Context
    ) -> character_pb2.Character:
        if not request.world_id or not request.display_name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "world_id and display_name are required")
        real_user_id = request.real_user_id if request.HasField("real_user_id") else ""
        doc: Doc = {
            "_id": str(uuid.uuid4()),
            "world_id": request.world_id,
            "is_ai": not real_user_id,
            "display_name": request.display_name,
            "avatar_url": "",
            "created_at": _now(),
        }
        if real_user_id:
            doc["real_user_id"] = real_user_id
        if request.HasField("meta"):
            doc["meta"] = request.meta
        if request.HasField("avatar_media_id") and request.avatar_media_id:
            media = await self._confirmed_media(request.avatar_media_id, context)
            doc["avatar_media_id"] = request.avatar_media_id
            doc["avatar_url"] = media.get("url", "")
        if request.HasField("request_id") and request.request_id:
            doc["request_id"] = request.request_id
        stored = await self._insert_once("characters", doc)
        return self._character_message(stored)

    async def _update_character(
        self, request: character_pb2.UpdateCharacterRequest, context: Context
    ) -> character_pb2.Character:
        col = self._col("characters")
        current = await col.find_one({"_id": request.character_id})
        if current is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"character {request.character_id} not found")
        updates: Doc = {}
        for name in ("display_name", "avatar_media_id", "avatar_url", "meta"):
            if request.HasField(name):
                updates[name] = getattr(request, name)
        if "avatar_media_id" in updates and "avatar_url" not in updates:
            media = await self._confirmed_media(updates["avatar_media_id"], context)
            updates["avatar_url"] = media.get("url", "")
        if updates:
            updates["updated_at"] = _now()
            await col.update_one({"_id": request.character_id}, {"$set": updates})
            current.update(updates)
        return self._character_message(current)

    async def _get_character(
        self, request: character_pb2.GetCharacterRequest, context: Context
    ) -> character_pb2.Character:
        doc = await self._col("characters").find_one({"_id": request.character_id})
        if doc is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"character {request.character_id} not found")
        return self._character_message(doc)

    async def _user_characters(
        self, request: character_pb2.GetUserCharactersInWorldRequest, context: Context
    ) -> character_pb2.CharacterList:
        # An AI character has no real user (CONTRACTS.md: "empty = AI character"), so an empty user_id lists
        # the world's AI characters, whether their real_user_id is absent, null or empty.
        user: Any = request.user_id if request.user_id else {"$in": ["", None]}
        cursor = self._col("characters").find({"world_id": request.world_id, "real_user_id": user})
        docs = await cursor.to_list(None)
        return character_pb2.CharacterList(characters=[self._character_message(d) for d in docs])

    async def _health_check(
        self, request: character_pb2.HealthCheckRequest, context: Context
    ) -> character_pb2.HealthCheckResponse:
        return character_pb2.HealthCheckResponse(status="SERVING")

    # --- MediaService --------------------------------------------------------------------------

    def _token(self, media_id: str, expires_at: int) -> str:
        return hmac.new(self._secret, f"{media_id}:{expires_at}".encode(), hashlib.sha256).hexdigest()

    def _media_url(self, media_id: str) -> str:
        return f"{self.upload_base_url}/media/{media_id}"

    async def _presigned_url(
        self, request: media_pb2.GetPresignedUploadURLRequest, context: Context
    ) -> media_pb2.GetPresignedUploadURLResponse:
        problems = []
        if not request.world_id:
            problems.append("world_id is required")
        if not request.filename:
            problems.append("filename is required")
        if not request.content_type.startswith("image/"):
            problems.append(f"content_type must be image/*, got {request.content_type!r}")
        if not 0 < request.size <= MAX_UPLOAD_BYTES:
            problems.append(f"size must be in 1..{MAX_UPLOAD_BYTES}, got {request.size}")
        if request.media_type not in media_pb2.MediaType.values() or request.media_type == 0:
            problems.append("media_type must be set")
        if problems:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems))
        media_id = str(uuid.uuid4())
        now = int(time.time())
        expires_at = now + UPLOAD_TTL_S
        await self._col("media").insert_one(
            {
                "_id": media_id,
                "status": "pending",
                "world_id": request.world_id,
                "character_id": request.character_id,
                "filename": _safe_filename(request.filename),
                "content_type": request.content_type,
                "size": request.size,
                "media_type": media_pb2.MediaType.Name(request.media_type),
                "created_at": _now(),
                "expires_at": expires_at,
            }
        )
        upload_url = (
            f"{self.upload_base_url}/upload/{media_id}"
            f"?expires={expires_at}&token={self._token(media_id, expires_at)}"
        )
        return media_pb2.GetPresignedUploadURLResponse(
            media_id=media_id, upload_url=upload_url, expires_at=expires_at
        )

    async def _confirm_upload(
        self, request: media_pb2.ConfirmUploadRequest, context: Context
    ) -> media_pb2.ConfirmUploadResponse:
        col = self._col("media")
        media = await col.find_one({"_id": request.media_id})
        if media is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"media {request.media_id} not found")
        if media.get("status") not in ("uploaded", "confirmed"):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"media {request.media_id} is {media.get('status')}: upload the bytes first",
            )
        if media.get("status") == "uploaded":
            try:
                width, height = await asyncio.to_thread(_image_size, Path(media["path"]))
            except (OSError, UnidentifiedImageError) as exc:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"media {request.media_id} is not a readable image: {exc}",
                )
            media.update(
                status="confirmed",
                url=self._media_url(request.media_id),
                width=width,
                height=height,
                confirmed_at=_now(),
            )
            await col.update_one(
                {"_id": request.media_id},
                {"$set": {k: media[k] for k in ("status", "url", "width", "height", "confirmed_at")}},
            )
        variant = media_pb2.MediaVariant(
            name="original", url=media["url"], width=int(media["width"]), height=int(media["height"])
        )
        return media_pb2.ConfirmUploadResponse(success=True, variants=[variant])

    # --- upload HTTP ---------------------------------------------------------------------------

    async def _http_upload(self, request: web.Request) -> web.Response:
        media_id = request.match_info["media_id"]
        token = request.query.get("token", "")
        try:
            expires_at = int(request.query.get("expires", ""))
        except ValueError:
            return web.Response(status=403, text="bad signature")
        if not hmac.compare_digest(token, self._token(media_id, expires_at)):
            return web.Response(status=403, text="bad signature")
        if time.time() > expires_at:
            return web.Response(status=410, text="upload URL expired")
        col = self._col("media")
        media = await col.find_one({"_id": media_id})
        if media is None:
            return web.Response(status=404, text="unknown media")
        if media.get("status") == "confirmed":
            return web.Response(status=409, text="media already confirmed")
        content_type = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if content_type != str(media["content_type"]).lower():
            return web.Response(
                status=400, text=f"content type {content_type!r} does not match {media['content_type']!r}"
            )
        body = await request.read()
        if not body:
            return web.Response(status=400, text="empty body")
        path = self._data_dir / "media" / f"{media_id}_{media['filename']}"
        await asyncio.to_thread(path.write_bytes, body)
        await col.update_one(
            {"_id": media_id},
            {
                "$set": {
                    "status": "uploaded",
                    "path": str(path),
                    "actual_size": len(body),
                    "uploaded_at": _now(),
                }
            },
        )
        return web.Response(status=200)

    async def _http_media(self, request: web.Request) -> web.StreamResponse:
        media_id = request.match_info["media_id"]
        media = await self._col("media").find_one({"_id": media_id})
        if media is None or media.get("status") != "confirmed":
            return web.Response(status=404, text="unknown media")
        return web.FileResponse(Path(media["path"]), headers={"Content-Type": media["content_type"]})

    # --- PostService ---------------------------------------------------------------------------

    async def _create_ai_post(
        self, request: post_pb2.CreateAIPostRequest, context: Context
    ) -> post_pb2.CreatePostResponse:
        if not request.character_id or not request.world_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "character_id and world_id are required")
        request_id = request.request_id if request.HasField("request_id") and request.request_id else None
        if request_id is not None and self.honour_request_id:
            existing = await self._count_repeat(self._col("posts"), request_id)
            if existing is not None:
                return post_pb2.CreatePostResponse(
                    post_id=str(existing["_id"]), created_at=_iso(existing.get("created_at"))
                )
        character = await self._col("characters").find_one({"_id": request.character_id})
        if character is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"character {request.character_id} not found")
        if not character.get("is_ai"):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"character {request.character_id} is not an AI character",
            )
        if character.get("world_id") != request.world_id:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"character {request.character_id} does not belong to world {request.world_id}",
            )
        if await self._col("worlds").find_one({"_id": request.world_id}) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"world {request.world_id} not found")
        if request.media_id:
            await self._confirmed_media(request.media_id, context)
        doc: Doc = {
            "_id": str(uuid.uuid4()),
            "character_id": request.character_id,
            "caption": request.caption,
            "media_id": request.media_id,
            "world_id": request.world_id,
            "tags": list(request.tags),
            "created_at": _now(),
        }
        if request_id is not None:
            doc["request_id"] = request_id
        stored = await self._insert_once("posts", doc, looked_up=True)
        return post_pb2.CreatePostResponse(
            post_id=str(stored["_id"]), created_at=_iso(stored.get("created_at"))
        )

    # --- WorldService --------------------------------------------------------------------------

    async def _update_world_image(
        self, request: world_pb2.UpdateWorldImageRequest, context: Context
    ) -> world_pb2.UpdateWorldImageResponse:
        if not (request.world_id and request.image_uuid and request.icon_uuid):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "world_id, image_uuid and icon_uuid are all required"
            )
        worlds = self._col("worlds")
        if await worlds.find_one({"_id": request.world_id}) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"world {request.world_id} not found")
        image = await self._confirmed_media(request.image_uuid, context)
        icon = await self._confirmed_media(request.icon_uuid, context)
        await worlds.update_one(
            {"_id": request.world_id},
            {
                "$set": {
                    "image_uuid": request.image_uuid,
                    "icon_uuid": request.icon_uuid,
                    "image_url": image.get("url", ""),
                    "icon_url": icon.get("url", ""),
                    "updated_at": _now(),
                }
            },
        )
        return world_pb2.UpdateWorldImageResponse(success=True, message="world images updated")

    async def _update_world_params(
        self, request: world_pb2.UpdateWorldParamsRequest, context: Context
    ) -> world_pb2.UpdateWorldParamsResponse:
        if not request.world_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "world_id is required")
        try:
            json.loads(request.params)
        except ValueError as exc:
            return world_pb2.UpdateWorldParamsResponse(success=False, message=f"params is not JSON: {exc}")
        now = _now()
        await self._col("worlds").update_one(
            {"_id": request.world_id},
            {
                "$set": {
                    "name": request.name,
                    "params": request.params,
                    "users_count": request.users_count,
                    "posts_count": request.posts_count,
                    "updated_at": now,
                },
                "$setOnInsert": {"created_at": now, "status": "active"},
            },
            upsert=True,
        )
        return world_pb2.UpdateWorldParamsResponse(success=True, message="world params updated")

    async def _get_world(
        self, request: world_pb2.GetWorldRequest, context: Context
    ) -> world_pb2.WorldResponse:
        doc = await self._col("worlds").find_one({"_id": request.world_id})
        if doc is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"world {request.world_id} not found")
        msg = world_pb2.WorldResponse(
            id=str(doc["_id"]),
            name=doc.get("name", ""),
            description=doc.get("description", ""),
            prompt=doc.get("prompt", ""),
            creator_id=doc.get("creator_id", ""),
            generation_status=doc.get("generation_status", ""),
            status=doc.get("status", ""),
            users_count=int(doc.get("users_count", 0)),
            posts_count=int(doc.get("posts_count", 0)),
            created_at=_iso(doc.get("created_at")),
            updated_at=_iso(doc.get("updated_at")),
            is_joined=False,
            image_url=doc.get("image_url", ""),
            icon_url=doc.get("icon_url", ""),
        )
        if doc.get("params") is not None:
            msg.params = doc["params"]
        return msg


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(io.BytesIO(path.read_bytes())) as image:
        image.load()
        return int(image.width), int(image.height)
