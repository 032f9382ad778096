"""Clients for the Generia platform's gRPC services, and how their addresses are found."""

from ai_worker.platform.clients import (
    CharacterClient,
    CharacterInfo,
    ConfirmedMedia,
    MediaClient,
    MediaKind,
    MediaVariantInfo,
    PlatformClients,
    PostClient,
    PresignedUpload,
    WorldClient,
    map_rpc_error,
)
from ai_worker.platform.discovery import ServiceResolver

__all__ = [
    "CharacterClient",
    "CharacterInfo",
    "ConfirmedMedia",
    "MediaClient",
    "MediaKind",
    "MediaVariantInfo",
    "PlatformClients",
    "PostClient",
    "PresignedUpload",
    "ServiceResolver",
    "WorldClient",
    "map_rpc_error",
]
