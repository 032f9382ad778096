"""The local platform (devstack) driven by our own clients over real sockets, on a SecantusDB daemon."""

from __future__ import annotations

import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import httpx
import pytest
from PIL import Image
from pymongo import MongoClient
from structlog.testing import capture_logs

from ai_worker.content.schemas import CharacterSpec
from ai_worker.devstack.platform_server import LocalPlatform
from ai_worker.errors import PlatformRejected, PlatformUnavailable
from ai_worker.jobs.character import CharacterParams, GenerateCharacter
from ai_worker.jobs.context import JobContext, Services
from ai_worker.platform import MediaKind, PlatformClients, ServiceResolver
from ai_worker.tasks.context import LeaseLost
from ai_worker.tasks.model import TaskDoc

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def mongo_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    exe = shutil.which("secantusd-py") or str(Path(sys.executable).with_name("secantusd-py"))
    if not Path(exe).exists():
        pytest.skip("secantusd-py (the embedded extra) is not installed")
    port = _free_port()
    storage = tmp_path_factory.mktemp("secantus")
    log = (storage.parent / "secantusd.log").open("wb")
    proc = subprocess.Popen(
        [exe, "--host", "127.0.0.1", "--port", str(port), "--storage-path", str(storage), "--sync-on-commit"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    uri = f"mongodb://127.0.0.1:{port}/?retryWrites=false&directConnection=true"
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"secantusd-py exited with {proc.returncode}")
            try:
                client: MongoClient[dict[str, object]] = MongoClient(uri, serverSelectionTimeoutMS=300)
                with client:
                    client.admin.command("ping")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield uri
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
async def platform(mongo_uri: str, tmp_path: Path) -> AsyncIterator[LocalPlatform]:
    local = LocalPlatform(
        mongo_uri=mongo_uri, data_dir=tmp_path / "platform", database=f"platform_{uuid.uuid4().hex[:8]}"
    )
    await local.start()
    try:
        yield local
    finally:
        await local.stop()


@pytest.fixture
async def clients(platform: LocalPlatform) -> AsyncIterator[PlatformClients]:
    names = ("character-service", "media-service", "post-service", "world-service")
    resolver = ServiceResolver("127.0.0.1:1", {n: platform.grpc_address for n in names}, cache_s=30)
    bundle = PlatformClients(resolver=resolver, deadline_s=5.0)
    try:
        yield bundle
    finally:
        await bundle.close()


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (30, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


async def _upload(clients: PlatformClients, world_id: str, kind: MediaKind, name: str, data: bytes) -> str:
    presigned = await clients.media.get_presigned_upload_url(
        world_id=world_id,
        character_id="",
        filename=name,
        content_type="image/png",
        size=len(data),
        media_type=kind,
    )
    async with httpx.AsyncClient() as http:
        response = await http.put(presigned.upload_url, content=data, headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    confirmed = await clients.media.confirm_upload(presigned.media_id)
    assert confirmed.success
    return presigned.media_id


async def test_create_character_is_idempotent(platform: LocalPlatform, clients: PlatformClients) -> None:
    first = await clients.characters.create_character(
        world_id="w1", display_name="Ada", meta='{"role": "poet"}', request_id="task1:char:0"
    )
    again = await clients.characters.create_character(
        world_id="w1", display_name="Ada", meta='{"role": "poet"}', request_id="task1:char:0"
    )
    other = await clients.characters.create_character(world_id="w1", display_name="Bob")
    assert first.id == again.id != other.id
    assert first.is_ai and first.meta == '{"role": "poet"}' and first.avatar_media_id is None
    assert await platform.database["characters"].count_documents({"request_id": "task1:char:0"}) == 1
    assert (await clients.characters.get_character(first.id)).display_name == "Ada"
    assert await clients.characters.health_check() == "SERVING"


async def test_presigned_upload_confirm_and_avatar(platform: LocalPlatform, clients: PlatformClients) -> None:
    data = _png(64, 32)
    presigned = await clients.media.get_presigned_upload_url(
        world_id="w2",
        character_id="",
        filename="avatar_w2_ada_0.png",
        content_type="image/png",
        size=len(data),
        media_type=MediaKind.CHARACTER_AVATAR,
    )
    async with httpx.AsyncClient() as http:
        # Confirming before the bytes arrive is refused.
        with pytest.raises(PlatformRejected, match="FAILED_PRECONDITION"):
            await clients.media.confirm_upload(presigned.media_id)
        bad = await http.put(
            presigned.upload_url.replace("token=", "token=00"),
            content=data,
            headers={"Content-Type": "image/png"},
        )
        assert bad.status_code == 403
        wrong_type = await http.put(
            presigned.upload_url, content=data, headers={"Content-Type": "image/jpeg"}
        )
        assert wrong_type.status_code == 400
        ok = await http.put(presigned.upload_url, content=data, headers={"Content-Type": "image/png"})
        assert ok.status_code == 200
        confirmed = await clients.media.confirm_upload(presigned.media_id)
        assert confirmed.success
        [variant] = confirmed.variants
        assert (variant.name, variant.width, variant.height) == ("original", 64, 32)
        served = await http.get(variant.url)
        assert served.status_code == 200 and served.content == data

    character = await clients.characters.create_character(world_id="w2", display_name="Ada")
    updated = await clients.characters.update_character(
        character_id=character.id, avatar_media_id=presigned.media_id
    )
    assert updated.avatar_media_id == presigned.media_id and updated.avatar_url == variant.url
    with pytest.raises(PlatformRejected, match="NOT_FOUND"):
        await clients.characters.update_character(character_id="missing", display_name="x")
    with pytest.raises(PlatformRejected, match="INVALID_ARGUMENT"):
        await clients.media.get_presigned_upload_url(
            world_id="w2",
            character_id="",
            filename="a.txt",
            content_type="text/plain",
            size=3,
            media_type=MediaKind.POST_IMAGE,
        )


async def test_create_ai_post_is_idempotent(platform: LocalPlatform, clients: PlatformClients) -> None:
    await platform.seed_world("w3", name="Third")
    character = await clients.characters.create_character(world_id="w3", display_name="Ada")
    media_id = await _upload(clients, "w3", MediaKind.POST_IMAGE, "post_w3_c_0.png", _png(16, 16))
    post_id = await clients.posts.create_ai_post(
        character_id=character.id,
        caption="hello",
        media_id=media_id,
        world_id="w3",
        tags=["a", "b"],
        request_id="task3:post:0",
    )
    again = await clients.posts.create_ai_post(
        character_id=character.id,
        caption="hello",
        media_id=media_id,
        world_id="w3",
        tags=["a", "b"],
        request_id="task3:post:0",
    )
    assert post_id == again
    assert await platform.database["posts"].count_documents({}) == 1
    text_only = await clients.posts.create_ai_post(
        character_id=character.id, caption="no image", media_id="", world_id="w3", tags=[]
    )
    assert text_only != post_id
    homeless = await clients.characters.create_character(world_id="nowhere", display_name="Eve")
    with pytest.raises(PlatformRejected, match="NOT_FOUND"):
        await clients.posts.create_ai_post(
            character_id=homeless.id, caption="x", media_id="", world_id="nowhere", tags=[]
        )
    with pytest.raises(PlatformRejected, match="INVALID_ARGUMENT"):
        await clients.posts.create_ai_post(
            character_id=character.id, caption="x", media_id="", world_id="nowhere", tags=[]
        )


async def test_world_params_and_images(platform: LocalPlatform, clients: PlatformClients) -> None:
    await clients.worlds.update_world_params(
        world_id="w4", params_json='{"name": "Fourth"}', name="Fourth", users_count=5, posts_count=20
    )
    with pytest.raises(PlatformRejected, match="INVALID_ARGUMENT"):
        await clients.worlds.update_world_image(world_id="w4", image_uuid="", icon_uuid="x")
    with pytest.raises(PlatformRejected):
        await clients.worlds.update_world_params(
            world_id="w4", params_json="{not json", name="Fourth", users_count=5, posts_count=20
        )
    header = await _upload(clients, "w4", MediaKind.WORLD_HEADER, "world_w4_header.png", _png(32, 16))
    icon = await _upload(clients, "w4", MediaKind.WORLD_ICON, "world_w4_icon.png", _png(16, 16))
    await clients.worlds.update_world_image(world_id="w4", image_uuid=header, icon_uuid=icon)
    world = await clients.worlds.get_world("w4")
    assert world["name"] == "Fourth" and world["users_count"] == 5 and world["posts_count"] == 20
    assert world["params"] == '{"name": "Fourth"}'
    assert world["image_url"].endswith(f"/media/{header}") and world["icon_url"].endswith(f"/media/{icon}")


async def test_fail_next_surfaces_as_unavailable(platform: LocalPlatform, clients: PlatformClients) -> None:
    platform.fail_next("CreateCharacter", grpc.StatusCode.UNAVAILABLE, times=2)
    for _ in range(2):
        with pytest.raises(PlatformUnavailable):
            await clients.characters.create_character(world_id="w5", display_name="Ada", request_id="r5")
    created = await clients.characters.create_character(world_id="w5", display_name="Ada", request_id="r5")
    assert created.display_name == "Ada"
    platform.fail_next("/generia.character.CharacterService/GetCharacter", grpc.StatusCode.PERMISSION_DENIED)
    with pytest.raises(PlatformRejected, match="PERMISSION_DENIED"):
        await clients.characters.get_character(created.id)


# --- real-platform mode: request_id ignored, every create creates --------------------------------------------


@pytest.fixture
async def real_platform(mongo_uri: str, tmp_path: Path) -> AsyncIterator[LocalPlatform]:
    database = f"platform_{uuid.uuid4().hex[:8]}"
    # A local-mode platform ran on this database before: its unique request_id index must not get in the way.
    async with LocalPlatform(mongo_uri=mongo_uri, data_dir=tmp_path / "local", database=database):
        pass
    real = LocalPlatform(mongo_uri=mongo_uri, data_dir=tmp_path / "real", database=database,
                         honour_request_id=False)
    await real.start()
    try:
        yield real
    finally:
        await real.stop()


@pytest.fixture
async def real_clients(real_platform: LocalPlatform) -> AsyncIterator[PlatformClients]:
    names = ("character-service", "media-service", "post-service", "world-service")
    resolver = ServiceResolver("127.0.0.1:1", {n: real_platform.grpc_address for n in names}, cache_s=30)
    bundle = PlatformClients(resolver=resolver, deadline_s=5.0)
    try:
        yield bundle
    finally:
        await bundle.close()


async def test_real_mode_creates_on_every_call_and_keeps_the_request_id(
        real_platform: LocalPlatform, real_clients: PlatformClients) -> None:
    c = real_clients
    first = await c.characters.create_character(world_id="r1", display_name="Ada", request_id="t1:create_character")
    again = await c.characters.create_character(world_id="r1", display_name="Ada", request_id="t1:create_character")
    assert first.id != again.id, "real mode ignores request_id: a repeated call is a second character"
    chars = [d async for d in real_platform.database["characters"].find({"request_id": "t1:create_character"})]
    assert len(chars) == 2 and all(d["create_calls"] == 1 for d in chars)

    await real_platform.seed_world("r1")
    media_ids = [await _upload(c, "r1", MediaKind.POST_IMAGE, "post_r1_x_0.png", _png(8, 8)) for _ in range(2)]
    assert len(set(media_ids)) == 2
    assert await real_platform.database["media"].count_documents({"world_id": "r1",
                                                                  "filename": "post_r1_x_0.png"}) == 2
    posts = [await c.posts.create_ai_post(character_id=first.id, caption="hi", media_id=media_ids[0], world_id="r1",
                                          tags=[], request_id="t2:create_post") for _ in range(2)]
    assert posts[0] != posts[1]
    assert await real_platform.database["posts"].count_documents({"request_id": "t2:create_post"}) == 2


async def test_local_mode_counts_repeated_create_calls(platform: LocalPlatform, clients: PlatformClients) -> None:
    for _ in range(3):
        await clients.characters.create_character(world_id="l1", display_name="Ada", request_id="t9:c")
    doc = await platform.database["characters"].find_one({"request_id": "t9:c"})
    assert doc is not None and doc["create_calls"] == 3
    assert await platform.database["characters"].count_documents({"request_id": "t9:c"}) == 1


async def test_empty_user_id_lists_the_worlds_ai_characters(real_platform: LocalPlatform,
                                                             real_clients: PlatformClients) -> None:
    c = real_clients.characters
    ai = await c.create_character(world_id="r2", display_name="Ada", meta='{"username": "ada"}')
    await c.create_character(world_id="r3", display_name="Elsewhere")
    await real_platform.database["characters"].insert_one(
        {"_id": "human", "world_id": "r2", "real_user_id": "u1", "is_ai": False, "display_name": "Human"})
    listed = await c.list_characters_in_world("r2")
    assert [(x.id, x.is_ai, x.meta) for x in listed] == [(ai.id, True, '{"username": "ada"}')]
    assert [x.id for x in await c.list_characters_in_world("r2", user_id="u1")] == ["human"]


# --- generate_character looks up what an earlier attempt made before creating again ------------------------


class _Steps:
    """A step store whose saves succeed, or fail as if the worker died right after the create call."""

    def __init__(self, *, dies: bool) -> None:
        self.dies = dies
        self.saved: dict[str, Any] = {}

    async def still_owned(self, task: TaskDoc, worker_id: str) -> bool:
        return True

    async def save_step(self, task: TaskDoc, worker_id: str, name: str, value: Any) -> bool:
        if self.dies:
            return False
        self.saved[name] = value
        return True


def _character_context(clients: PlatformClients, params: CharacterParams, *, attempt: int, steps: _Steps,
                       task_id: str = "char-task", world_id: str = "r5") -> JobContext:
    task = TaskDoc.model_validate({"_id": task_id, "type": "generate_character", "world_id": world_id,
                                   "status": "in_progress", "attempt_count": attempt,
                                   "parameters": params.model_dump(mode="json")})
    services = Services(llm=cast(Any, None), images=cast(Any, None), media=cast(Any, None), platform=clients,
                        prompts=cast(Any, None), worlds=cast(Any, None))
    return JobContext(services=services, task=task, worker_id="w1", max_attempts=2, steps=steps,
                      is_cancelled=lambda: False)


def _spec(username: str, display_name: str) -> CharacterSpec:
    return CharacterSpec(username=username, display_name=display_name, bio="b", personality="p", occupation="o",
                         interests=["i"], speaking_style="s", avatar_prompt="a")


async def test_retried_character_reuses_what_the_dead_attempt_created(
        real_platform: LocalPlatform, real_clients: PlatformClients) -> None:
    chars = real_platform.database["characters"]
    params = CharacterParams(index=0, character=_spec("ada_vale", "Ada Vale"), posts_count=2)
    # Another character of the same world, and one with the same username in another world: never matched.
    await real_clients.characters.create_character(world_id="r5", display_name="Bob",
                                                   meta=json.dumps({"username": "bob"}))
    await real_clients.characters.create_character(world_id="r6", display_name="Ada Vale",
                                                   meta=json.dumps({"username": "ada_vale"}))
    # Attempt 1 creates the character and dies before its id is saved in the task.
    with pytest.raises(LeaseLost):
        await GenerateCharacter().run(_character_context(real_clients, params, attempt=1, steps=_Steps(dies=True)),
                                      params)
    made = [d async for d in chars.find({"world_id": "r5", "display_name": "Ada Vale"})]
    assert len(made) == 1
    # Attempt 2 has no memoised id: it finds that character instead of making a second one.
    steps = _Steps(dies=False)
    with capture_logs() as logs:
        result = await GenerateCharacter().run(_character_context(real_clients, params, attempt=2, steps=steps),
                                               params)
    assert result["character_id"] == made[0]["_id"] == steps.saved["character_id"]
    assert await chars.count_documents({"world_id": "r5", "display_name": "Ada Vale"}) == 1
    assert any(e["event"].startswith("character made by an earlier attempt found") for e in logs), logs


async def test_retried_character_creates_when_the_earlier_attempt_made_nothing(
        real_platform: LocalPlatform, real_clients: PlatformClients) -> None:
    params = CharacterParams(index=1, character=_spec("cora_reed", "Cora Reed"), posts_count=0)
    # A namesake with another username, and an unparsable meta: neither is this task's character.
    await real_clients.characters.create_character(world_id="r7", display_name="Cora Reed",
                                                   meta=json.dumps({"username": "cora_reed_2"}))
    await real_clients.characters.create_character(world_id="r7", display_name="Cora Reed", meta="not json")
    result = await GenerateCharacter().run(
        _character_context(real_clients, params, attempt=2, steps=_Steps(dies=False), world_id="r7"), params)
    created = await real_platform.database["characters"].find_one({"_id": result["character_id"]})
    assert created is not None and json.loads(created["meta"])["username"] == "cora_reed"
    assert await real_platform.database["characters"].count_documents({"world_id": "r7"}) == 3


async def test_first_attempt_does_not_look_up(real_platform: LocalPlatform, real_clients: PlatformClients) -> None:
    """Attempt 1 cannot have a predecessor: it creates straight away (one create call, no list call)."""
    params = CharacterParams(index=2, character=_spec("dax_frost", "Dax Frost"), posts_count=0)
    await real_clients.characters.create_character(world_id="r8", display_name="Dax Frost",
                                                   meta=json.dumps({"username": "dax_frost"}))
    real_platform.fail_next("GetUserCharactersInWorld", grpc.StatusCode.INTERNAL)  # a look-up would fail
    await GenerateCharacter().run(
        _character_context(real_clients, params, attempt=1, steps=_Steps(dies=False), world_id="r8"), params)
    assert await real_platform.database["characters"].count_documents({"world_id": "r8"}) == 2
    real_platform.fail_next("GetUserCharactersInWorld", grpc.StatusCode.INTERNAL, times=0)
