from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateCharacterRequest(_message.Message):
    __slots__ = ("world_id", "real_user_id", "display_name", "avatar_media_id", "meta", "request_id")
    WORLD_ID_FIELD_NUMBER: _ClassVar[int]
    REAL_USER_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    AVATAR_MEDIA_ID_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    world_id: str
    real_user_id: str
    display_name: str
    avatar_media_id: str
    meta: str
    request_id: str
    def __init__(self, world_id: _Optional[str] = ..., real_user_id: _Optional[str] = ..., display_name: _Optional[str] = ..., avatar_media_id: _Optional[str] = ..., meta: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class UpdateCharacterRequest(_message.Message):
    __slots__ = ("character_id", "display_name", "avatar_media_id", "avatar_url", "meta")
    CHARACTER_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    AVATAR_MEDIA_ID_FIELD_NUMBER: _ClassVar[int]
    AVATAR_URL_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    character_id: str
    display_name: str
    avatar_media_id: str
    avatar_url: str
    meta: str
    def __init__(self, character_id: _Optional[str] = ..., display_name: _Optional[str] = ..., avatar_media_id: _Optional[str] = ..., avatar_url: _Optional[str] = ..., meta: _Optional[str] = ...) -> None: ...

class GetCharacterRequest(_message.Message):
    __slots__ = ("character_id",)
    CHARACTER_ID_FIELD_NUMBER: _ClassVar[int]
    character_id: str
    def __init__(self, character_id: _Optional[str] = ...) -> None: ...

class GetUserCharactersInWorldRequest(_message.Message):
    __slots__ = ("user_id", "world_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    WORLD_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    world_id: str
    def __init__(self, user_id: _Optional[str] = ..., world_id: _Optional[str] = ...) -> None: ...

class Character(_message.Message):
    __slots__ = ("id", "world_id", "real_user_id", "is_ai", "display_name", "avatar_media_id", "avatar_url", "meta", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    WORLD_ID_FIELD_NUMBER: _ClassVar[int]
    REAL_USER_ID_FIELD_NUMBER: _ClassVar[int]
    IS_AI_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    AVATAR_MEDIA_ID_FIELD_NUMBER: _ClassVar[int]
    AVATAR_URL_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    world_id: str
    real_user_id: str
    is_ai: bool
    display_name: str
    avatar_media_id: str
    avatar_url: str
    meta: str
    created_at: str
    def __init__(self, id: _Optional[str] = ..., world_id: _Optional[str] = ..., real_user_id: _Optional[str] = ..., is_ai: _Optional[bool] = ..., display_name: _Optional[str] = ..., avatar_media_id: _Optional[str] = ..., avatar_url: _Optional[str] = ..., meta: _Optional[str] = ..., created_at: _Optional[str] = ...) -> None: ...

class CharacterList(_message.Message):
    __slots__ = ("characters",)
    CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    characters: _containers.RepeatedCompositeFieldContainer[Character]
    def __init__(self, characters: _Optional[_Iterable[_Union[Character, _Mapping]]] = ...) -> None: ...

class HealthCheckRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthCheckResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: str
    def __init__(self, status: _Optional[str] = ...) -> None: ...
