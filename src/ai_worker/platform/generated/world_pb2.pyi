from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class UpdateWorldImageRequest(_message.Message):
    __slots__ = ("world_id", "image_uuid", "icon_uuid")
    WORLD_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_UUID_FIELD_NUMBER: _ClassVar[int]
    ICON_UUID_FIELD_NUMBER: _ClassVar[int]
    world_id: str
    image_uuid: str
    icon_uuid: str
    def __init__(self, world_id: _Optional[str] = ..., image_uuid: _Optional[str] = ..., icon_uuid: _Optional[str] = ...) -> None: ...

class UpdateWorldImageResponse(_message.Message):
    __slots__ = ("success", "message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class UpdateWorldParamsRequest(_message.Message):
    __slots__ = ("world_id", "params", "name", "users_count", "posts_count")
    WORLD_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    USERS_COUNT_FIELD_NUMBER: _ClassVar[int]
    POSTS_COUNT_FIELD_NUMBER: _ClassVar[int]
    world_id: str
    params: str
    name: str
    users_count: int
    posts_count: int
    def __init__(self, world_id: _Optional[str] = ..., params: _Optional[str] = ..., name: _Optional[str] = ..., users_count: _Optional[int] = ..., posts_count: _Optional[int] = ...) -> None: ...

class UpdateWorldParamsResponse(_message.Message):
    __slots__ = ("success", "message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class GetWorldRequest(_message.Message):
    __slots__ = ("world_id", "user_id")
    WORLD_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    world_id: str
    user_id: str
    def __init__(self, world_id: _Optional[str] = ..., user_id: _Optional[str] = ...) -> None: ...

class WorldResponse(_message.Message):
    __slots__ = ("id", "name", "description", "prompt", "creator_id", "generation_status", "status", "users_count", "posts_count", "created_at", "updated_at", "is_joined", "image_url", "icon_url", "params")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CREATOR_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_STATUS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    USERS_COUNT_FIELD_NUMBER: _ClassVar[int]
    POSTS_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    IS_JOINED_FIELD_NUMBER: _ClassVar[int]
    IMAGE_URL_FIELD_NUMBER: _ClassVar[int]
    ICON_URL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    description: str
    prompt: str
    creator_id: str
    generation_status: str
    status: str
    users_count: int
    posts_count: int
    created_at: str
    updated_at: str
    is_joined: bool
    image_url: str
    icon_url: str
    params: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., prompt: _Optional[str] = ..., creator_id: _Optional[str] = ..., generation_status: _Optional[str] = ..., status: _Optional[str] = ..., users_count: _Optional[int] = ..., posts_count: _Optional[int] = ..., created_at: _Optional[str] = ..., updated_at: _Optional[str] = ..., is_joined: _Optional[bool] = ..., image_url: _Optional[str] = ..., icon_url: _Optional[str] = ..., params: _Optional[str] = ...) -> None: ...
