"""What every image provider returns, and the interface it implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

PNG = "image/png"


@dataclass(frozen=True)
class GeneratedImage:
    """A generated image, already normalised to exactly `width` x `height` PNG bytes."""

    data: bytes
    content_type: str
    width: int
    height: int
    model: str
    provider: str
    cost: float = 0.0


class ImageProvider(Protocol):
    name: str
    model: str

    async def generate(self, prompt: str, width: int, height: int) -> GeneratedImage: ...
