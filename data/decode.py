"""Decoding of the kept members of a sample: image header, class index, caption.

Only images (PIL), UTF-8 text, integer classes and JSON are ever decoded; nothing is unpickled.
Images are opened lazily so the transform can read the size from the header and ask the JPEG
decoder for a reduced scale (DCT scaling) before any pixel is decoded.
"""
from __future__ import annotations

import io
import json
import warnings

from PIL import Image

from .shards import IMAGE_EXTENSIONS

# Refuse absurd images (decompression bombs) instead of letting a worker run out of memory.
Image.MAX_IMAGE_PIXELS = 16384 * 16384


# What PIL raises on bytes that are not a valid image (truncated, corrupt, bomb, wrong format).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, Image.DecompressionBombError,
                Image.DecompressionBombWarning)


class DecodeError(Exception):
    """A member exists but its content is unusable; ``reason`` is a faults.* counter key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def image_bytes(members: dict[str, bytes]) -> bytes | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in members:
            return members[ext]
    return None


def open_image(data: bytes) -> Image.Image:
    """Open lazily (header only); raises PIL/OS errors on bytes that are not an image."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
    if image.width < 1 or image.height < 1:
        raise OSError(f"empty image {image.size}")
    return image


def decode_class(data: bytes) -> int:
    """``b"417\\n"`` -> 417."""
    text = data.decode("ascii").strip()
    value = int(text)
    if value < 0:
        raise ValueError(f"negative class {value}")
    return value


def decode_caption(members: dict[str, bytes]) -> str | None:
    """The ``.txt`` caption, else the ``caption`` field of ``.json`` (img2dataset), else None."""
    if "txt" in members:
        return members["txt"].decode("utf-8").strip()
    if "json" in members:
        meta = json.loads(members["json"].decode("utf-8"))
        caption = meta.get("caption") if isinstance(meta, dict) else None
        if isinstance(caption, str):
            return caption.strip()
    return None
