"""Decoding of the kept members of a sample: image, class index, caption.

Only images, UTF-8 text, integer classes and JSON are ever decoded; nothing is unpickled, and only
the Pillow plugins of ``PIL_FORMATS`` ever see image bytes (so no ``.jpg`` member can reach the EPS
plugin, which runs Ghostscript, or TIFF/PSD/FITS parsers). Images
are read header first so the transform can pick its crop, then only that crop is decoded, at the
smallest DCT scale that still covers it at the output size.

JPEG decoders, fastest first (``INTERNIMAGE_JPEG_DECODER`` = ``region``, ``simplejpeg`` or
``pil`` forces one; ``auto`` is the default):

- ``region``: our libjpeg-turbo extension ``internimage.data._jpeg`` (``data/csrc/jpeg_region.cpp``,
  built when the libjpeg-turbo headers are installed) decodes only the crop's columns and stops
  after its last row: 0.96 ms against simplejpeg's 1.17 ms for the whole 500x375 q90 image, for
  random-resized crops, on one core here.
- ``simplejpeg``: the whole image straight into a numpy array, ~16% faster than PIL.
- ``pil``: PIL, the fallback for every other format and for files the strict decoders reject.

All three wrap libjpeg-turbo; with the scale chosen by the same rule they give identical pixels
(tested).
"""
from __future__ import annotations

import importlib
import io
import json
import os
import warnings

import numpy as np
from PIL import Image

try:
    import simplejpeg
except ImportError:  # optional: PIL decodes the same pixels, a little slower
    simplejpeg = None
try:
    _jpeg = importlib.import_module("internimage.data._jpeg")
    REGION_DECODER_ERROR = None
except ImportError as error:  # built only where the libjpeg-turbo headers were found
    _jpeg = None
    REGION_DECODER_ERROR = f"{type(error).__name__}: {error}"

from .shards import IMAGE_EXTENSIONS


# The image formats the data layer accepts: the only Pillow plugins that ever see member bytes.
PIL_FORMATS = ("JPEG", "PNG", "WEBP")
# Transparent pixels are composited onto white (a transparent product shot on a web page is seen
# on white); dropping the alpha channel instead showed whatever colour the file stored there,
# black for most encoders.
ALPHA_BACKGROUND = (255, 255, 255)
EXIF_ORIENTATION_TAG = 0x0112
# Largest class id a .cls may hold when the model's class count is not known: int64's range.
MAX_CLASS_ID = 2**63 - 1

# What PIL raises on bytes that are not a valid image (truncated, corrupt, bomb, wrong format).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, Image.DecompressionBombError,
                Image.DecompressionBombWarning)


class DecodeError(Exception):
    """A member exists but its content is unusable; ``reason`` is a faults.* counter key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def guarded(reason: str, function, *args):
    """``function(*args)``; any exception it raises becomes a DecodeError for ``reason``.

    Hostile bytes reach third-party parsers (PIL, json, int) whose failure modes are open-ended
    (RecursionError, OverflowError, struct.error, ...); listing them would miss the next one.
    """
    try:
        return function(*args)
    except DecodeError:
        raise
    except Exception as error:  # noqa: BLE001 - one bad sample must never stop a run
        raise DecodeError(reason, f"{type(error).__name__}: {error}") from error


def image_bytes(members: dict[str, bytes], keys=IMAGE_EXTENSIONS) -> bytes | None:
    """The first member among ``keys`` (extensions in order of preference), or None."""
    for ext in keys:
        if ext in members:
            return members[ext]
    return None


def open_image(data: bytes) -> Image.Image:
    """Open lazily (header only); raises PIL/OS errors on bytes that are not an image.

    Images over PIL's ``MAX_IMAGE_PIXELS`` (decompression bombs) are refused, not decoded. Only
    the ``PIL_FORMATS`` plugins are tried, whatever the member's extension says.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    if image.width < 1 or image.height < 1:
        raise OSError(f"empty image {image.size}")
    return image


JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
DECODER_ENV = "INTERNIMAGE_JPEG_DECODER"
DECODER_CHOICES = ("auto", "region", "simplejpeg", "pil")


def _decoder_choice() -> str:
    choice = os.environ.get(DECODER_ENV, "auto").lower()
    if choice not in DECODER_CHOICES:
        raise ValueError(f"{DECODER_ENV}={choice!r} is not one of {', '.join(DECODER_CHOICES)}")
    return choice


_CHOICE = _decoder_choice()
USE_REGION_DECODER = _jpeg is not None and _CHOICE in ("auto", "region")
USE_SIMPLEJPEG = simplejpeg is not None and _CHOICE in ("auto", "simplejpeg", "region")
Box = tuple[float, float, float, float]  # left, top, width, height in source pixels


def jpeg_reduction(width: int, height: int, want: tuple[int, int] | None) -> int:
    """DCT scale denominator (1, 2, 4 or 8) that keeps at least ``want`` pixels: PIL's rule."""
    if not want:
        return 1
    ratio = min(width // max(1, want[0]), height // max(1, want[1]))
    return next(r for r in (8, 4, 2, 1) if ratio >= r or r == 1)


def scaled_size(width: int, height: int, reduction: int) -> tuple[int, int]:
    """Size of a JPEG decoded at DCT scale 1/reduction (libjpeg rounds up)."""
    return -(-width // reduction), -(-height // reduction)


def jpeg_decoder_name() -> str:
    if USE_REGION_DECODER:
        return f"region (libjpeg-turbo {_jpeg.LIBJPEG_TURBO_VERSION})"
    return "simplejpeg" if USE_SIMPLEJPEG else "PIL"


def pixel_window(box: Box, size: tuple[int, int], decoded: tuple[int, int]
                 ) -> tuple[int, int, int, int]:
    """``box`` in source pixels of an image of ``size`` (w, h) -> (x0, y0, x1, y1) in pixels of
    the same image decoded at ``decoded`` (w, h); never empty, never outside."""
    left, top, width, height = box
    sx, sy = decoded[0] / size[0], decoded[1] / size[1]
    x0 = min(int(round(left * sx)), decoded[0] - 1)
    y0 = min(int(round(top * sy)), decoded[1] - 1)
    x1 = max(x0 + 1, min(int(round((left + width) * sx)), decoded[0]))
    y1 = max(y0 + 1, min(int(round((top + height) * sy)), decoded[1]))
    return x0, y0, x1, y1


class EncodedImage:
    """Image bytes with the size read from the header; ``decode_region`` and ``decode_rgb``
    decode them.

    Raises one of ``IMAGE_ERRORS`` for bytes that are not a readable image.
    """

    def __init__(self, data: bytes):
        self.data = data
        self._pil: Image.Image | None = None
        header = None
        if USE_SIMPLEJPEG and data[:3] == JPEG_MAGIC:
            try:
                header = simplejpeg.decode_jpeg_header(data)
            except ValueError:
                header = None
        if header is not None and header[2] in ("Gray", "YCbCr", "RGB"):
            self.size = (int(header[1]), int(header[0]))
            if self.size[0] * self.size[1] > Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{self.size} exceeds the pixel limit")
            if min(self.size) < 1:
                raise OSError(f"empty image {self.size}")
        else:
            self._pil = open_image(data)
            self.size = self._pil.size

    def decode_region(self, box: Box, want: tuple[int, int] | None = None) -> np.ndarray:
        """uint8 (h, w, 3): ``box`` of the image decoded at the smallest DCT scale that keeps the
        whole image at least ``want`` (w, h) pixels; a JPEG is decoded only as far as the box."""
        is_jpeg = self.data[:3] == JPEG_MAGIC and (self._pil is None or self._pil.format == "JPEG")
        # The region decoder stops after the box, so it would accept a file cut below the box; a
        # file without its end marker goes to the full decoders, which refuse it whatever the crop.
        if USE_REGION_DECODER and is_jpeg and self.data.endswith(JPEG_END):
            reduction = jpeg_reduction(*self.size, want)
            x0, y0, x1, y1 = pixel_window(box, self.size, scaled_size(*self.size, reduction))
            pixels = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
            try:
                _jpeg.decode_region(self.data, reduction, x0, y0, x1 - x0, y1 - y0, pixels)
                return pixels
            except _jpeg.JPEGError:
                pass  # strict about libjpeg warnings: the lenient decoders below decide
        decoded = self.decode_rgb(want)
        x0, y0, x1, y1 = pixel_window(box, self.size, (decoded.shape[1], decoded.shape[0]))
        return decoded[y0:y1, x0:x1]

    def decode_rgb(self, want: tuple[int, int] | None = None) -> np.ndarray:
        """uint8 (H', W', 3); JPEGs at the smallest DCT scale that keeps ``want`` (w, h) pixels."""
        if self._pil is None:
            min_width, min_height = scaled_size(*self.size, jpeg_reduction(*self.size, want))
            try:
                return simplejpeg.decode_jpeg(self.data, colorspace="RGB", min_width=min_width,
                                              min_height=min_height)
            except ValueError:
                self._pil = open_image(self.data)  # PIL raises its own error if truly corrupt
        image = self._pil
        if image.format == "JPEG" and want:
            image.draft("RGB", want)
        return to_rgb_array(image)


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """uint8 (H, W, 3) of an image in any mode the accepted formats produce.

    16-bit grey (PNG ``I;16``, or ``I``) is scaled by 255/65535 (``convert("RGB")`` clips it, so
    anything above 255 of 65535 came out white); an alpha channel or a transparent palette entry
    is composited onto ``ALPHA_BACKGROUND``; every other mode goes through ``convert("RGB")``.
    """
    if image.mode == "RGB":
        return np.array(image)
    if image.mode.startswith("I"):
        grey = np.asarray(image).astype(np.int64).clip(0, 65535)
        return np.repeat(((grey * 255 + 32767) // 65535).astype(np.uint8)[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        background = Image.new("RGBA", image.size, ALPHA_BACKGROUND + (255,))
        return np.array(Image.alpha_composite(background, image.convert("RGBA")).convert("RGB"))
    return np.array(image.convert("RGB"))


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) of image bytes; 1 (as stored) when absent or unreadable."""
    try:
        value = open_image(data).getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to drop the image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """(H, W, C) as stored -> as displayed for EXIF ``orientation`` (what ImageOps.exif_transpose
    does, on the array: 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise,
    7 transverse, 8 rotate 90 anticlockwise)."""
    moves = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1],
             4: lambda a: a[::-1], 5: lambda a: a.transpose(1, 0, 2),
             6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
             8: lambda a: np.rot90(a, 1)}
    return np.ascontiguousarray(moves[orientation](pixels))


def decode_class(data: bytes, num_classes: int | None = None) -> int:
    """``b"417\\n"`` -> 417; ValueError unless 0 <= id < num_classes (int64's range if None)."""
    text = data.decode("ascii").strip()
    value = int(text)
    limit = MAX_CLASS_ID if num_classes is None else num_classes - 1
    if not 0 <= value <= limit:
        raise ValueError(f"class {value if len(text) < 40 else text[:40] + '...'} is outside "
                         f"[0, {limit}]")
    return value


def decode_caption(members: dict[str, bytes], keys=("txt", "json")) -> str | None:
    """The caption of the first of ``keys`` present: a text member as it is, a key ending in
    ``json`` by its ``caption`` field (img2dataset); None when there is none."""
    for key in keys:
        if key not in members:
            continue
        if not key.endswith("json"):
            return members[key].decode("utf-8").strip()
        try:
            meta = json.loads(members[key].decode("utf-8"))
        except RecursionError:  # nesting deeper than Python's stack: hostile, not a caption
            raise ValueError("JSON nested too deeply") from None
        caption = meta.get("caption") if isinstance(meta, dict) else None
        if isinstance(caption, str):
            return caption.strip()
    return None
