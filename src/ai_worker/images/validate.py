"""Check that provider bytes really are an image, and bring them to the exact size we upload (as PNG)."""

from __future__ import annotations

import io
import warnings

import structlog
from PIL import Image, ImageOps, UnidentifiedImageError

from ai_worker.errors import InvalidImage

log = structlog.get_logger(__name__)

# Pillow format name -> MIME type, for the formats image models return.
_FORMAT_TYPES = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}
_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/x-png": "image/png"}
MAX_SIDE = 8192


def _canonical(content_type: str) -> str:
    base = content_type.split(";", 1)[0].strip().lower()
    return _ALIASES.get(base, base)


def normalize_image(data: bytes, declared_content_type: str | None, width: int, height: int) -> bytes:
    """PNG bytes of exactly `width` x `height` (cover-resize, centre crop) from provider bytes.

    Raises InvalidImage when the bytes are not a decodable image. A declared type that disagrees with the
    actual format (a data URL saying image/png around JPEG bytes) is accepted and converted, with a warning.
    """
    if width < 1 or height < 1:
        raise ValueError(f"invalid target size {width}x{height}")
    if not data:
        raise InvalidImage("empty image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                probe.verify()  # structural check; the image must be reopened afterwards
            opened = Image.open(io.BytesIO(data))
            opened.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"bytes are not a valid image: {type(exc).__name__}: {exc}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage(f"image too large: {exc}") from None

    fmt = opened.format
    actual = _FORMAT_TYPES.get(fmt or "", f"image/{(fmt or 'unknown').lower()}")
    image: Image.Image = opened
    if declared_content_type:
        declared = _canonical(declared_content_type)
        if declared != actual:
            log.warning("image_type_mismatch", declared=declared, actual=actual)
    if image.width > MAX_SIDE or image.height > MAX_SIDE:
        raise InvalidImage(f"image too large: {image.width}x{image.height}")

    opened.seek(0)  # animated formats: keep the first frame only
    image = ImageOps.exif_transpose(image)
    has_alpha = image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info)
    image = image.convert("RGBA" if has_alpha else "RGB")
    if image.size != (width, height):
        image = ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()
