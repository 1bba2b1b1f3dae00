"""RandAugment on PIL images ("rand-m9-mstd0.5-inc1" semantics).

Each of ``layers`` rounds picks one operation uniformly and applies it with probability 0.5. The
magnitude is drawn per operation from Normal(magnitude, mstd) and clipped to [0, 10]; every
operation's strength increases with the magnitude (the "increasing" variant), and signed
operations (rotate, shear, translate, enhance) flip their sign with probability 0.5.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0
# Fill for pixels uncovered by geometric operations: the ImageNet mean colour.
FILL = (124, 116, 104)


def _signed(level: float, maximum: float, rng: np.random.Generator) -> float:
    value = level / MAX_LEVEL * maximum
    return -value if rng.random() < 0.5 else value


def _affine(image: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    return image.transform(image.size, Image.Transform.AFFINE, matrix,
                           resample=Image.Resampling.BILINEAR, fillcolor=FILL)


def auto_contrast(image, level, rng):
    return ImageOps.autocontrast(image)


def equalize(image, level, rng):
    return ImageOps.equalize(image)


def invert(image, level, rng):
    return ImageOps.invert(image)


def rotate(image, level, rng):
    return image.rotate(_signed(level, 30.0, rng), resample=Image.Resampling.BILINEAR,
                        fillcolor=FILL)


def posterize(image, level, rng):
    # 8 bits (identity) at level 0 down to 4 bits at level 10.
    return ImageOps.posterize(image, 8 - int(round(level / MAX_LEVEL * 4)))


def solarize(image, level, rng):
    # Threshold 256 (identity) at level 0 down to 0 (full inversion) at level 10.
    return ImageOps.solarize(image, 256 - int(level / MAX_LEVEL * 256))


def solarize_add(image, level, rng):
    shift = int(level / MAX_LEVEL * 110)
    pixels = np.asarray(image, dtype=np.int16)
    added = np.where(pixels < 128, np.minimum(pixels + shift, 255), pixels)
    return Image.fromarray(added.astype(np.uint8), image.mode)


def _enhance(kind):
    def apply(image, level, rng):
        return kind(image).enhance(1.0 + _signed(level, 0.9, rng))
    return apply


def shear_x(image, level, rng):
    return _affine(image, (1, _signed(level, 0.3, rng), 0, 0, 1, 0))


def shear_y(image, level, rng):
    return _affine(image, (1, 0, 0, _signed(level, 0.3, rng), 1, 0))


def _shift(image: Image.Image, dx: int, dy: int) -> Image.Image:
    """Content moved by (-dx, -dy) whole pixels, uncovered pixels FILL (an affine translate by
    (dx, dy) rounded to whole pixels, without resampling: a crop pasted on a filled canvas, 20x
    faster than the affine call)."""
    width, height = image.size
    out = Image.new(image.mode, image.size, FILL)
    if abs(dx) < width and abs(dy) < height:
        kept = image.crop((max(0, dx), max(0, dy), width + min(0, dx), height + min(0, dy)))
        out.paste(kept, (max(0, -dx), max(0, -dy)))
    return out


def translate_x(image, level, rng):
    return _shift(image, int(round(_signed(level, 0.45, rng) * image.width)), 0)


def translate_y(image, level, rng):
    return _shift(image, 0, int(round(_signed(level, 0.45, rng) * image.height)))


OPERATIONS: dict[str, Callable] = {
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Invert": invert,
    "Rotate": rotate,
    "Posterize": posterize,
    "Solarize": solarize,
    "SolarizeAdd": solarize_add,
    "Color": _enhance(ImageEnhance.Color),
    "Contrast": _enhance(ImageEnhance.Contrast),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateXRel": translate_x,
    "TranslateYRel": translate_y,
}
_OPERATION_LIST = list(OPERATIONS.values())


def rand_augment(image: Image.Image, layers: int, magnitude: float, mstd: float,
                 rng: np.random.Generator, prob: float = 0.5) -> Image.Image:
    """Apply ``layers`` random operations to an RGB image; same size and mode out."""
    for _ in range(layers):
        operation = _OPERATION_LIST[int(rng.integers(len(_OPERATION_LIST)))]
        if rng.random() >= prob:
            continue
        level = magnitude if mstd <= 0 else float(np.clip(rng.normal(magnitude, mstd), 0.0,
                                                          MAX_LEVEL))
        image = operation(image, level, rng)
    return image
