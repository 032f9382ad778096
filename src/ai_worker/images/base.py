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


Size = tuple[int, int]


class ImageProvider(Protocol):
    """`generate` returns an image of exactly width x height. `source`, when given, is the size to ask the
    model for (the registry's `image_sizes`, chosen where the provider prices by size); the result is then
    normalised to width x height. A provider whose price does not depend on the size may ignore it."""

    name: str
    model: str

    async def generate(self, prompt: str, width: int, height: int, *, source: Size | None = None
                       ) -> GeneratedImage: ...
