"""CPU transforms: shapes, dtypes, ranges, determinism, and agreement with plain PIL references."""
import io

import numpy as np
import pytest
from PIL import Image

from internimage.data import DataConfig, SourceConfig
from internimage.data.randaugment import OPERATIONS, rand_augment
from internimage.data.transforms import eval_transform, random_resized_crop_box, train_transform


def photo(width=500, height=375, fmt="JPEG", seed=0) -> bytes:
    """A smooth photo-like image with detail, encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    noise = rng.normal(0, 6, base.shape)
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def plain_config(**overrides) -> DataConfig:
    values = dict(train_sources=[SourceConfig("x", "x.tar")], img_size=64, randaugment=False,
                  color_jitter=0.0, reprob=0.0, hflip=0.0)
    values.update(overrides)
    return DataConfig(**values)


def reference_eval(data: bytes, size: int, crop_ratio: float) -> np.ndarray:
    """Full decode, resize short side to size/crop_ratio (bicubic), centre crop: the textbook way."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    short = round(size / crop_ratio)
    scale = short / min(image.size)
    resized = image.resize((round(image.width * scale), round(image.height * scale)),
                           Image.Resampling.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_eval_transform_matches_resize_then_centre_crop(fmt):
    # 600x480 -> short side 96/0.75 = 128 -> 160x128 -> crop offsets 32 and 16: exact geometry.
    data = photo(width=600, height=480, fmt=fmt)
    ours = eval_transform(data, 96, 0.75)
    reference = reference_eval(data, 96, 0.75)
    assert ours.shape == (96, 96, 3) and ours.dtype == np.uint8
    # One resampling of the same region; for JPEG the decoder also works at a reduced DCT scale.
    error = np.abs(ours.astype(int) - reference)
    assert error.mean() < (0.1 if fmt == "PNG" else 1.5) and error.max() <= 3


def test_crop_of_the_whole_image_equals_a_plain_resize():
    data = photo(fmt="PNG", width=120, height=90)
    cfg = plain_config(img_size=48, crop_scale=[1.0, 1.0], crop_ratio=[4 / 3, 4 / 3])
    ours = train_transform(data, cfg, np.random.default_rng(0))
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(
        (48, 48), Image.Resampling.BICUBIC))
    assert np.abs(ours.astype(int) - reference).max() <= 1


def test_jpeg_reduced_scale_decode_is_close_to_a_full_decode():
    data = photo(width=1600, height=1200)
    cfg = plain_config(img_size=64, crop_scale=[1.0, 1.0], crop_ratio=[4 / 3, 4 / 3])
    ours = train_transform(data, cfg, np.random.default_rng(0))
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(
        (64, 64), Image.Resampling.BICUBIC))
    assert np.abs(ours.astype(int) - full).mean() < 1.5


def test_random_resized_crop_boxes_respect_scale_ratio_and_bounds():
    rng = np.random.default_rng(0)
    for _ in range(500):
        left, top, w, h = random_resized_crop_box(500, 375, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left and 0 <= top and left + w <= 500 and top + h <= 375
        assert 0.08 * 0.9 <= w * h / (500 * 375) <= 1.0
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    # An image far outside the ratio range falls back to a centre crop of the clamped ratio.
    assert random_resized_crop_box(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3), rng) == (493, 0, 13, 10)


def test_train_transform_is_deterministic_under_a_seed_and_varies_across_seeds():
    data = photo()
    cfg = plain_config(randaugment=True, hflip=0.5)
    first = train_transform(data, cfg, np.random.default_rng(7))
    again = train_transform(data, cfg, np.random.default_rng(7))
    other = [train_transform(data, cfg, np.random.default_rng(seed)) for seed in range(5)]
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert len({o.tobytes() for o in other}) == 5


def test_horizontal_flip_mirrors_the_same_crop():
    data = photo()
    kept = train_transform(data, plain_config(hflip=0.0), np.random.default_rng(3))
    flipped = train_transform(data, plain_config(hflip=1.0), np.random.default_rng(3))
    assert np.array_equal(flipped, kept[:, ::-1])


def test_color_jitter_is_used_only_without_randaugment():
    data = photo()
    base = train_transform(data, plain_config(), np.random.default_rng(1))
    jittered = train_transform(data, plain_config(color_jitter=0.4), np.random.default_rng(1))
    assert not np.array_equal(base, jittered)


def test_every_randaugment_operation_keeps_size_and_mode():
    image = Image.open(io.BytesIO(photo(width=64, height=48)))
    rng = np.random.default_rng(0)
    for name, operation in OPERATIONS.items():
        for level in (0.0, 5.0, 10.0):
            out = operation(image, level, rng)
            assert out.size == image.size and out.mode == "RGB", name


def test_randaugment_operations_at_level_zero_are_identities_where_they_should_be():
    image = Image.open(io.BytesIO(photo(width=64, height=48, fmt="PNG"))).convert("RGB")
    rng = np.random.default_rng(0)
    for name in ("Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
                 "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        assert np.array_equal(np.asarray(OPERATIONS[name](image, 0.0, rng)), np.asarray(image)), name
    inverted = 255 - np.asarray(image)
    assert np.array_equal(np.asarray(OPERATIONS["Solarize"](image, 10.0, rng)), inverted)
    assert np.array_equal(np.asarray(OPERATIONS["Invert"](image, 3.0, rng)), inverted)


def test_randaugment_with_no_layers_changes_nothing():
    image = Image.open(io.BytesIO(photo(width=32, height=32)))
    assert rand_augment(image, 0, 9, 0.5, np.random.default_rng(0)) is image


@pytest.mark.parametrize("width,height,want", [(500, 375, None), (1600, 1200, (400, 300)),
                                               (1600, 1200, (150, 150)), (333, 207, (40, 30))])
def test_simplejpeg_and_pil_decode_identical_pixels(monkeypatch, width, height, want):
    pytest.importorskip("simplejpeg")
    from internimage.data import decode

    data = photo(width=width, height=height)
    monkeypatch.setattr(decode, "USE_SIMPLEJPEG", True)
    fast = decode.EncodedImage(data).decode_rgb(want)
    monkeypatch.setattr(decode, "USE_SIMPLEJPEG", False)
    plain = decode.EncodedImage(data).decode_rgb(want)
    assert fast.shape == plain.shape
    assert np.array_equal(fast, plain)


def test_grey_and_png_images_decode_to_rgb():
    from internimage.data.decode import EncodedImage

    for fmt in ("JPEG", "PNG"):
        buffer = io.BytesIO()
        Image.new("L", (30, 20), 77).save(buffer, format=fmt)
        pixels = EncodedImage(buffer.getvalue()).decode_rgb()
        assert pixels.shape == (20, 30, 3) and abs(int(pixels.mean()) - 77) <= 1


@pytest.mark.parametrize("name,index", [("TranslateXRel", 0), ("TranslateYRel", 1)])
def test_translations_match_pil_affine_at_whole_pixels(name, index):
    from internimage.data import randaugment

    image = Image.open(io.BytesIO(photo(width=40, height=30, fmt="PNG"))).convert("RGB")
    for level in (2.0, 7.0, 10.0):
        rng = np.random.default_rng(int(level))
        ours = np.asarray(OPERATIONS[name](image, level, rng))
        rng = np.random.default_rng(int(level))
        shift = randaugment._signed(level, 0.45, rng) * image.size[index]
        matrix = (1, 0, round(shift), 0, 1, 0) if index == 0 else (1, 0, 0, 0, 1, round(shift))
        expected = image.transform(image.size, Image.Transform.AFFINE, matrix,
                                   resample=Image.Resampling.NEAREST, fillcolor=randaugment.FILL)
        assert np.array_equal(ours, np.asarray(expected)), (name, level)


@pytest.mark.parametrize("use_simplejpeg", [False, True])
def test_images_over_the_pixel_limit_are_refused(monkeypatch, use_simplejpeg):
    from internimage.data import decode

    if use_simplejpeg:
        pytest.importorskip("simplejpeg")
    monkeypatch.setattr(decode, "USE_SIMPLEJPEG", use_simplejpeg)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the photo has 40 x 32 = 1280 pixels
    with pytest.raises(decode.IMAGE_ERRORS):
        decode.EncodedImage(photo(width=40, height=32))


@pytest.mark.parametrize("use_out_overload", [True, False])
def test_bicubic_resize_writes_contiguous_rows_equal_to_interpolate(monkeypatch, use_out_overload):
    import torch
    import torch.nn.functional as F

    from internimage.data import transforms

    if not use_out_overload:
        monkeypatch.setattr(transforms, "_AA_BICUBIC_OUT", None)
    pixels = np.random.default_rng(0).integers(0, 256, (97, 130, 3), dtype=np.uint8)
    region = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    resized = transforms.resize_bicubic_hwc(region, 48)
    expected = F.interpolate(region, size=(48, 48), mode="bicubic", antialias=True)
    assert resized.shape == (48, 48, 3) and resized.flags["C_CONTIGUOUS"]
    assert np.array_equal(resized, expected[0].permute(1, 2, 0).numpy())
