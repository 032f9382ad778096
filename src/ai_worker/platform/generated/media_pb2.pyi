from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MediaType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEDIA_TYPE_UNKNOWN: _ClassVar[MediaType]
    MEDIA_TYPE_WORLD_HEADER: _ClassVar[MediaType]
    MEDIA_TYPE_WORLD_ICON: _ClassVar[MediaType]
    MEDIA_TYPE_CHARACTER_AVATAR: _ClassVar[MediaType]
    MEDIA_TYPE_POST_IMAGE: _ClassVar[MediaType]
MEDIA_TYPE_UNKNOWN: MediaType
MEDIA_TYPE_WORLD_HEADER: MediaType
MEDIA_TYPE_WORLD_ICON: MediaType
MEDIA_TYPE_CHARACTER_AVATAR: MediaType
MEDIA_TYPE_POST_IMAGE: MediaType

class GetPresignedUploadURLRequest(_message.Message):
    __slots__ = ("world_id", "character_id", "filename", "content_type", "size", "media_type")
    WORLD_ID_FIELD_NUMBER: _ClassVar[int]
    CHARACTER_ID_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    world_id: str
    character_id: str
    filename: str
    content_type: str
    size: int
    media_type: MediaType
    def __init__(self, world_id: _Optional[str] = ..., character_id: _Optional[str] = ..., filename: _Optional[str] = ..., content_type: _Optional[str] = ..., size: _Optional[int] = ..., media_type: _Optional[_Union[MediaType, str]] = ...) -> None: ...

class GetPresignedUploadURLResponse(_message.Message):
    __slots__ = ("media_id", "upload_url", "expires_at")
    MEDIA_ID_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_URL_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    media_id: str
    upload_url: str
    expires_at: int
    def __init__(self, media_id: _Optional[str] = ..., upload_url: _Optional[str] = ..., expires_at: _Optional[int] = ...) -> None: ...

class ConfirmUploadRequest(_message.Message):
    __slots__ = ("media_id",)
    MEDIA_ID_FIELD_NUMBER: _ClassVar[int]
    media_id: str
    def __init__(self, media_id: _Optional[str] = ...) -> None: ...

class MediaVariant(_message.Message):
    __slots__ = ("name", "url", "width", "height")
    NAME_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    url: str
    width: int
    height: int
    def __init__(self, name: _Optional[str] = ..., url: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class ConfirmUploadResponse(_message.Message):
    __slots__ = ("success", "variants")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    variants: _containers.RepeatedCompositeFieldContainer[MediaVariant]
    def __init__(self, success: _Optional[bool] = ..., variants: _Optional[_Iterable[_Union[MediaVariant, _Mapping]]] = ...) -> None: ...
