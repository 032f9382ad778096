"""A provider that needs no network: draws a deterministic placeholder picture from the prompt.

Used for IMAGE_PROVIDER=offline (demos, tests, running without an API key) and by the provider simulator.
The same prompt and size always give the same bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import random

from PIL import Image, ImageDraw, ImageFont

from ai_worker.images.base import PNG, GeneratedImage, Size

_PROMPT_WORDS = 6


def _palette(rng: random.Random) -> list[tuple[int, int, int]]:
    return [(rng.randrange(30, 226), rng.randrange(30, 226), rng.randrange(30, 226)) for _ in range(4)]


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, ValueError, TypeError):  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def _label_lines(prompt: str) -> list[str]:
    words = prompt.split()[:_PROMPT_WORDS]
    text = " ".join(words) + (" ..." if len(prompt.split()) > _PROMPT_WORDS else "")
    if len(words) <= 3:
        return [text] if text else []
    half = (len(words) + 1) // 2
    return [" ".join(words[:half]), " ".join(words[half:]) + (" ..." if text.endswith("...") else "")]


def render_placeholder(prompt: str, width: int, height: int, label: str = "OFFLINE") -> bytes:
    """PNG bytes of a `width` x `height` picture: colours and shapes from a hash of the prompt, the
    `label` in large letters and the first words of the prompt."""
    if width < 1 or height < 1:
        raise ValueError(f"invalid size {width}x{height}")
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    colours = _palette(rng)

    # Vertical gradient between two palette colours: one column, stretched sideways in C.
    top, bottom = colours[0], colours[1]
    column = Image.new("RGB", (1, height))
    span = max(1, height - 1)
    column.putdata([tuple(int(top[i] + (bottom[i] - top[i]) * y / span) for i in range(3)) for y in range(height)])
    image = column.resize((width, height), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    # A few shapes.
    for _ in range(rng.randint(3, 7)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        size = rng.randint(max(4, min(width, height) // 10), max(8, min(width, height) // 2))
        box = (x0 - size // 2, y0 - size // 2, x0 + size // 2, y0 + size // 2)
        fill = colours[rng.randrange(2, 4)]
        if rng.random() < 0.5:
            draw.ellipse(box, fill=fill, outline=(255, 255, 255), width=max(1, size // 40))
        else:
            draw.rectangle(box, fill=fill, outline=(0, 0, 0), width=max(1, size // 40))

    # Label in the middle, prompt words under it, on a dark band for contrast.
    big = _font(max(10, min(width // 8, height // 5)))
    small = _font(max(8, min(width // 24, height // 12)))
    lines = _label_lines(prompt)
    band_top = int(height * 0.30)
    band_bottom = int(height * 0.78)
    draw.rectangle((0, band_top, width, band_bottom), fill=(16, 16, 24))
    draw.text((width / 2, height * 0.42), label, fill=(255, 255, 255), font=big, anchor="mm")
    for i, line in enumerate(lines):
        draw.text((width / 2, height * (0.58 + 0.1 * i)), line, fill=(220, 220, 220), font=small, anchor="mm")

    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)  # a placeholder: fast to make beats small
    return out.getvalue()


class OfflineImageProvider:
    name = "offline"

    def __init__(self, model: str = "offline-renderer") -> None:
        self.model = model

    async def generate(self, prompt: str, width: int, height: int, *, source: Size | None = None
                       ) -> GeneratedImage:
        data = await asyncio.to_thread(render_placeholder, prompt, width, height)
        return GeneratedImage(
            data=data, content_type=PNG, width=width, height=height, model=self.model, provider=self.name
        )

    async def aclose(self) -> None:
        return None
