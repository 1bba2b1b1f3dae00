"""The region JPEG decoder (``internimage.data._jpeg``) returns exactly the pixels of a full decode
inside the region, for every chroma layout, progressive files, greyscale and every DCT scale;
refuses what it cannot decode with a ValueError; and the loader falls back to the other decoders
for those files."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from internimage.data import decode
from internimage.data.transforms import decode_crop_resize, random_resized_crop_box

REQUIRE_ENV = "INTERNIMAGE_REQUIRE_JPEG_REGION"
jpeg = decode._jpeg
needs_region_decoder = pytest.mark.skipif(
    jpeg is None, reason=f"region decoder not built here: {decode.REGION_DECODER_ERROR}")


def photo_jpeg(width=203, height=151, mode="RGB", seed=0, **save_options) -> bytes:
    """Smooth colour gradients with grain: detail in luma and chroma for the upsampler to show."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=save_options.pop("quality", 90), **save_options)
    return buffer.getvalue()


def full_decode(data: bytes, reduction: int) -> np.ndarray:
    """The reference: PIL decodes the whole image at the DCT scale 1/reduction."""
    image = Image.open(io.BytesIO(data))
    scaled = (-(-image.width // reduction), -(-image.height // reduction))
    image.draft("RGB", (image.width // reduction, image.height // reduction))
    pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[1::-1] == scaled
    return pixels


def region(data: bytes, reduction: int, left: int, top: int, width: int, height: int):
    out = np.empty((height, width, 3), np.uint8)
    jpeg.decode_region(data, reduction, left, top, width, height, out)
    return out


LAYOUTS = {
    "4:2:0": dict(subsampling=2),
    "4:2:2": dict(subsampling=1),
    "4:4:4": dict(subsampling=0),
    "progressive 4:2:0": dict(subsampling=2, progressive=True),
    "greyscale": dict(mode="L"),
}


@needs_region_decoder
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reduction", [1, 2, 4, 8])
def test_region_equals_the_same_region_of_a_full_decode(layout, reduction):
    data = photo_jpeg(**LAYOUTS[layout])
    full = full_decode(data, reduction)
    height, width = full.shape[:2]
    rng = np.random.default_rng(reduction)
    boxes = [(0, 0, width, height), (0, 0, 1, 1), (width - 1, height - 1, 1, 1)]
    for _ in range(25):
        left, top = int(rng.integers(0, width)), int(rng.integers(0, height))
        boxes.append((left, top, int(rng.integers(1, width - left + 1)),
                      int(rng.integers(1, height - top + 1))))
    for left, top, w, h in boxes:
        ours = region(data, reduction, left, top, w, h)
        assert np.array_equal(ours, full[top:top + h, left:left + w]), (left, top, w, h)


@needs_region_decoder
def test_bad_requests_are_value_errors_that_say_what_is_wrong():
    data = photo_jpeg()
    with pytest.raises(ValueError, match="reduction must be 1, 2, 4 or 8"):
        region(data, 3, 0, 0, 4, 4)
    for left, top, width, height in [(-16, 0, 4, 4), (0, -1, 4, 4), (0, 0, 0, 4),
                                     (2**32 - 1, 0, 4, 4), (0, 2**32 - 1, 4, 2)]:
        out = np.empty(max(width * height * 3, 1), np.uint8)
        with pytest.raises(ValueError, match="need left, top >= 0") as caught:
            jpeg.decode_region(data, 1, left, top, width, height, out)
        assert not isinstance(caught.value, jpeg.JPEGError)  # a caller's bug, not a bad file
    with pytest.raises(ValueError, match="out must be C-contiguous with 48 bytes"):
        jpeg.decode_region(data, 1, 0, 0, 4, 4, np.empty(47, np.uint8))
    with pytest.raises(TypeError):
        jpeg.decode_region(data, 1, 0, 0, 4, 4, b"\0" * 48)  # read-only output


@needs_region_decoder
def test_a_region_beyond_the_image_is_a_jpeg_error_naming_both_sizes():
    data = photo_jpeg()
    with pytest.raises(jpeg.JPEGError, match="outside the 203x151 image"):
        region(data, 1, 200, 0, 4, 4)
    with pytest.raises(jpeg.JPEGError, match="outside the 102x76 image decoded at 1/2"):
        region(data, 2, 0, 70, 10, 10)


@needs_region_decoder
@pytest.mark.parametrize("damage", ["random bytes", "cut in half", "cut in the header"])
def test_damaged_files_raise_jpeg_error(damage):
    data = photo_jpeg()
    broken = {"random bytes": os.urandom(2000), "cut in half": data[: len(data) // 2],
              "cut in the header": data[:100]}[damage]
    with pytest.raises(jpeg.JPEGError):
        region(broken, 1, 0, 0, 203, 151)


@needs_region_decoder
def test_a_region_above_a_cut_decodes_exactly():
    """Decoding stops after the region's last row, so damage below it is never reached."""
    data = photo_jpeg(width=160, height=480)
    ours = region(data[: len(data) * 2 // 3], 1, 10, 0, 100, 64)
    assert np.array_equal(ours, full_decode(data, 1)[0:64, 10:110])


@needs_region_decoder
def test_cmyk_falls_back_to_pil_with_the_same_crop(monkeypatch):
    data = photo_jpeg(mode="CMYK")
    with pytest.raises(ValueError, match="colour space"):
        region(data, 1, 0, 0, 8, 8)
    box = (20.0, 10.0, 120.0, 100.0)
    got = decode.EncodedImage(data).decode_region(box)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[10:110, 20:140]
    assert np.array_equal(got, expected)


@needs_region_decoder
@pytest.mark.parametrize("box", [(0, 0, 300, 300), (0, 0, 300, 40)])
def test_truncated_file_is_refused_whatever_the_crop(box):
    """Even when the crop lies above the cut: the verdict on a file never depends on the crop."""
    data = photo_jpeg(width=300, height=300)
    with pytest.raises(decode.IMAGE_ERRORS):
        decode.EncodedImage(data[: len(data) // 2]).decode_region(box)


@needs_region_decoder
@pytest.mark.parametrize("size", [64, 224])
def test_crop_resize_is_identical_with_and_without_the_region_decoder(monkeypatch, size):
    data = photo_jpeg(width=500, height=375)
    decoded, decode_region = [], jpeg.decode_region

    def counting_decode_region(*args):
        decode_region(*args)
        decoded.append(args[2:6])

    monkeypatch.setattr(jpeg, "decode_region", counting_decode_region)
    for seed in range(8):
        def box(w, h, seed=seed):
            return random_resized_crop_box(w, h, (0.08, 1.0), (3 / 4, 4 / 3),
                                           np.random.default_rng(seed))
        monkeypatch.setattr(decode, "USE_REGION_DECODER", True)
        fast = decode_crop_resize(data, box, size)
        monkeypatch.setattr(decode, "USE_REGION_DECODER", False)
        whole = decode_crop_resize(data, box, size)
        assert np.array_equal(fast, whole), seed
    assert len(decoded) == 8  # the region decoder really ran, every time


def test_unknown_decoder_choice_names_the_valid_ones(monkeypatch):
    monkeypatch.setenv(decode.DECODER_ENV, "turbo")
    with pytest.raises(ValueError, match="auto, region, simplejpeg, pil"):
        decode._decoder_choice()


@pytest.mark.skipif(os.environ.get(REQUIRE_ENV) != "1",
                    reason=f"only when {REQUIRE_ENV}=1 (CI) demands the compiled decoder")
def test_ci_uses_the_region_decoder():
    assert decode.USE_REGION_DECODER, decode.REGION_DECODER_ERROR
    assert decode.jpeg_decoder_name().startswith("region")
