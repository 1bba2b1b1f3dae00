"""Demo data from scikit-learn's 1,797 handwritten-digit scans (8x8, 10 classes), no network.

    python -m internimage.data.demo --out DIR

writes ``DIR/classes/{train-000000..000003,val-000000}.tar`` (22K-style: ``.jpg`` + ``.cls``) and
``DIR/captions/{train-000000..000003,val-000000}.tar`` (LAION-style: ``.jpg`` + ``.txt``), each with
its ``-index.json``, ``DIR/classes/classes.json`` and, last, ``DIR/version.txt`` (the launcher
rewrites a folder whose version is older). Every fifth scan goes to validation.
Training captions vary their wording; validation captions all read "a scan of the handwritten
digit NAME", so a digit's captions are identical and retrieval (where an identical caption counts
as a hit) asks whether image and text agree on the digit, not which wording a scan happened to draw.
"""
from __future__ import annotations

import argparse
import io
import os

import numpy as np
from PIL import Image

from .writer import Sample, ShardWriter, write_class_map

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TRAIN_SHARDS = 4
IMAGE_SIZE = 64
CAPTION_TEMPLATES = [
    "a scan of the handwritten digit {name}",
    "the number {name}, written by hand",
    "a small grayscale image of a handwritten {name}",
    "handwritten digit {digit} ({name})",
    "a blurry scan of the numeral {name}",
    "an old scanned form showing a {name}",
]
VAL_CAPTION_TEMPLATE = CAPTION_TEMPLATES[0]
# Raise when the shards change: 2 = validation captions in one wording.
DEMO_DATA_VERSION = "2"
VERSION_FILE = "version.txt"


def digit_jpeg(pixels: np.ndarray, size: int = IMAGE_SIZE) -> bytes:
    """8x8 scan with values 0..16 (16 = ink) -> dark ink on white paper, size x size RGB JPEG."""
    gray = (255 - pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(gray, "L").resize((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def caption_for(digit: int, rng: np.random.Generator) -> str:
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    return template.format(name=DIGIT_NAMES[digit], digit=digit)


def write_demo_data(out_dir: str) -> dict:
    """Write the demo shards; returns their patterns and sample counts.

    Keys: ``classes_train``, ``classes_val``, ``captions_train``, ``captions_val`` (brace patterns),
    ``num_classes``, ``train_samples``, ``val_samples``, ``class_map``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target.astype(int)
    is_val = np.arange(len(labels)) % 5 == 0
    train_index, val_index = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    per_shard = -(-len(train_index) // TRAIN_SHARDS)
    rng = np.random.default_rng(0)
    jpegs = [digit_jpeg(image) for image in images]
    captions = [caption_for(label, rng) for label in labels]
    for i in val_index:
        captions[i] = VAL_CAPTION_TEMPLATE.format(name=DIGIT_NAMES[labels[i]], digit=labels[i])
    result: dict = {"num_classes": len(DIGIT_NAMES), "train_samples": len(train_index),
                    "val_samples": len(val_index)}
    for kind in ("classes", "captions"):
        folder = os.path.join(out_dir, kind)
        for split, indices in (("train", train_index), ("val", val_index)):
            with ShardWriter(folder, split, max_samples=per_shard) as writer:
                for i in indices:
                    label = int(labels[i]) if kind == "classes" else None
                    caption = captions[i] if kind == "captions" else None
                    writer.write(Sample(f"digit{i:05d}", jpegs[i], "jpg", label, caption))
            result[f"{kind}_{split}"] = writer.pattern()
    result["class_map"] = write_class_map(os.path.join(out_dir, "classes"), DIGIT_NAMES)
    with open(os.path.join(out_dir, VERSION_FILE), "w") as f:
        f.write(DEMO_DATA_VERSION + "\n")
    return result


def demo_data_current(out_dir: str) -> bool:
    """Whether ``out_dir`` holds complete demo shards of this version."""
    try:
        with open(os.path.join(out_dir, VERSION_FILE)) as f:
            return f.read().strip() == DEMO_DATA_VERSION
    except OSError:
        return False


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    result = write_demo_data(parser.parse_args(argv).out)
    for key, value in result.items():
        print(f"{key}: {value}")
    return result


if __name__ == "__main__":
    main()
