from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class CreateAIPostRequest(_message.Message):
    __slots__ = ("character_id", "caption", "media_id", "world_id", "tags", "request_id")
    CHARACTER_ID_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    MEDIA_ID_FIELD_NUMBER: _ClassVar[int]
    WORLD_ID_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    character_id: str
    caption: str
    media_id: str
    world_id: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, character_id: _Optional[str] = ..., caption: _Optional[str] = ..., media_id: _Optional[str] = ..., world_id: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreatePostResponse(_message.Message):
    __slots__ = ("post_id", "created_at")
    POST_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    post_id: str
    created_at: str
    def __init__(self, post_id: _Optional[str] = ..., created_at: _Optional[str] = ...) -> None: ...
