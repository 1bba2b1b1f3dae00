"""Image modes: 16-bit grey is scaled, alpha is composited on white, EXIF orientation on request."""
import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from internimage.data.decode import EncodedImage
from internimage.data.transforms import eval_transform


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_16_bit_png_is_scaled_not_saturated_to_white():
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    pixels = EncodedImage(png(Image.fromarray(ramp))).decode_rgb()
    assert pixels.dtype == np.uint8 and pixels.shape == (8, 64, 3)
    assert np.abs(pixels[..., 0].astype(int) - np.round(ramp / 257)).max() <= 1
    assert (pixels[..., 0] == pixels[..., 2]).all()


@pytest.mark.parametrize("mode,transparent", [("RGBA", (0, 0, 0, 0)), ("LA", (0, 0))])
def test_transparent_pixels_are_composited_on_white(mode, transparent):
    image = Image.new(mode, (8, 8), transparent)
    half_opaque = (200, 0, 0, 128) if mode == "RGBA" else (0, 128)
    image.putpixel((0, 0), half_opaque)
    pixels = EncodedImage(png(image)).decode_rgb()
    assert (pixels[1:, 1:] == 255).all()  # fully transparent: the white background
    expected = (228, 127, 127) if mode == "RGBA" else (127, 127, 127)
    assert np.abs(pixels[0, 0].astype(int) - expected).max() <= 1


def test_a_transparent_palette_entry_is_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    image.putpixel((1, 1), 1)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=0)
    pixels = EncodedImage(buffer.getvalue()).decode_rgb()
    assert (pixels[0, 0] == 255).all() and tuple(pixels[1, 1]) == (10, 200, 10)


def rotated_jpeg(orientation: int) -> bytes:
    """64 x 32 as stored: red left half, blue right half, with the EXIF orientation given."""
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32, 0] = 255
    pixels[:, 32:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow_when_asked(orientation):
    from internimage.data.decode import orient

    data = rotated_jpeg(orientation)
    upright = np.array(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert np.array_equal(orient(EncodedImage(data).decode_rgb(), orientation), upright)


def test_exif_orientation_is_off_by_default_and_turns_the_crop_when_on():
    data = rotated_jpeg(6)  # displayed rotated 90 degrees clockwise: 32 x 64, red on top
    stored = eval_transform(data, 16, 1.0)
    upright = eval_transform(data, 16, 1.0, exif_transpose=True)
    assert stored[2, 2, 0] > 200 and stored[13, 2, 0] > 200  # red left half, as stored
    assert upright[2, 2, 0] > 200 and upright[13, 2, 2] > 200  # red top, blue bottom
