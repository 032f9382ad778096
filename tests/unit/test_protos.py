"""The committed stubs are what scripts/gen_protos.py produces, and the wire names match CONTRACTS.md."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from ai_worker.platform.generated import (
    character_pb2,
    character_pb2_grpc,
    media_pb2,
    post_pb2,
    world_pb2,
)

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "src" / "ai_worker" / "platform" / "generated"


def _load_generator() -> object:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_protos", module)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    gen = _load_generator()
    gen.generate(tmp_path)  # type: ignore[attr-defined]
    fresh = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    committed = sorted(p.name for p in GENERATED.iterdir() if p.is_file() and p.suffix in {".py", ".pyi"})
    assert fresh == committed, "generated file set differs: run scripts/gen_protos.py"
    stale = [name for name in fresh if (tmp_path / name).read_bytes() != (GENERATED / name).read_bytes()]
    assert not stale, f"stale generated files {stale}: run scripts/gen_protos.py"


def test_generated_imports_are_package_relative() -> None:
    for path in GENERATED.glob("*_grpc.py"):
        text = path.read_text(encoding="utf-8")
        assert "\nimport character_pb2" not in text and "\nimport media_pb2" not in text
    assert character_pb2_grpc.character__pb2 is character_pb2  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("file", "service", "method"),
    [
        (character_pb2, "CharacterService", "CreateCharacter"),
        (character_pb2, "CharacterService", "UpdateCharacter"),
        (character_pb2, "CharacterService", "GetCharacter"),
        (character_pb2, "CharacterService", "GetUserCharactersInWorld"),
        (character_pb2, "CharacterService", "HealthCheck"),
        (media_pb2, "MediaService", "GetPresignedUploadURL"),
        (media_pb2, "MediaService", "ConfirmUpload"),
        (post_pb2, "PostService", "CreateAIPost"),
        (world_pb2, "WorldService", "UpdateWorldImage"),
        (world_pb2, "WorldService", "UpdateWorldParams"),
        (world_pb2, "WorldService", "GetWorld"),
    ],
)
def test_method_paths(file: object, service: str, method: str) -> None:
    descriptor = file.DESCRIPTOR.services_by_name[service]  # type: ignore[attr-defined]
    assert descriptor.methods_by_name[method].name == method


def test_full_method_paths() -> None:
    def path(file: object, service: str, method: str) -> str:
        svc = file.DESCRIPTOR.services_by_name[service]  # type: ignore[attr-defined]
        return f"/{svc.full_name}/{svc.methods_by_name[method].name}"

    assert path(character_pb2, "CharacterService", "CreateCharacter") == (
        "/generia.character.CharacterService/CreateCharacter"
    )
    assert (
        path(media_pb2, "MediaService", "GetPresignedUploadURL")
        == "/media.MediaService/GetPresignedUploadURL"
    )
    assert path(post_pb2, "PostService", "CreateAIPost") == "/post.PostService/CreateAIPost"
    assert path(world_pb2, "WorldService", "UpdateWorldImage") == "/world.WorldService/UpdateWorldImage"


def _number(message: object, name: str) -> int:
    return int(message.DESCRIPTOR.fields_by_name[name].number)  # type: ignore[attr-defined]


def test_field_numbers() -> None:
    create = character_pb2.CreateCharacterRequest
    assert [_number(create, n) for n in ("world_id", "real_user_id", "display_name")] == [1, 2, 3]
    assert [_number(create, n) for n in ("avatar_media_id", "meta", "request_id")] == [4, 5, 6]
    assert create.DESCRIPTOR.fields_by_name["real_user_id"].has_presence
    character = character_pb2.Character
    assert _number(character, "is_ai") == 4 and _number(character, "created_at") == 9
    presign = media_pb2.GetPresignedUploadURLRequest
    assert _number(presign, "size") == 5 and _number(presign, "media_type") == 6
    assert media_pb2.MediaType.Value("MEDIA_TYPE_CHARACTER_AVATAR") == 3
    assert media_pb2.MediaType.Value("MEDIA_TYPE_POST_IMAGE") == 4
    assert _number(media_pb2.MediaVariant, "height") == 4
    post = post_pb2.CreateAIPostRequest
    assert _number(post, "tags") == 5 and _number(post, "request_id") == 6
    assert _number(world_pb2.UpdateWorldParamsRequest, "posts_count") == 5
    assert _number(world_pb2.WorldResponse, "params") == 15
    assert world_pb2.WorldResponse.DESCRIPTOR.fields_by_name["params"].has_presence
    assert media_pb2.DESCRIPTOR.package == "media" and character_pb2.DESCRIPTOR.package == "generia.character"


def test_media_kind_mirrors_proto_enum() -> None:
    from ai_worker.platform import MediaKind

    for kind in MediaKind:
        assert media_pb2.MediaType.Value(f"MEDIA_TYPE_{kind.name}") == kind.value
    assert len(MediaKind) == len(media_pb2.MediaType.keys()) - 1
