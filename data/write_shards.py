"""Create WebDataset shards from an ImageFolder tree or a list file.

    python -m internimage.data.write_shards --imagefolder /data/in22k/train --out /shards/in22k
    python -m internimage.data.write_shards --list captions.tsv --kind caption --out /shards/cc

ImageFolder: one sub-folder per class, class indices in sorted folder order, the class map saved as
``classes.json`` beside the shards. List file: ``path<TAB>label`` (kind class, integer label) or
``path<TAB>caption`` (kind caption), relative paths resolved against the list file's folder.
JPEG, PNG and WebP files are stored as they are; other formats are re-encoded to PNG.

Samples are written in a seeded random order (``--seed``, default 0; ``--no-shuffle`` keeps the
input order): the loader's shuffle only permutes chunks of consecutive samples, so shards written
class after class gave batches of a few classes each (50 classes x 40 images: ~12 distinct classes
in a batch of 32 instead of ~24).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from .writer import Sample, ShardWriter, write_class_map

STORED_AS_IS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
IMAGE_SUFFIXES = set(STORED_AS_IS) | {".bmp", ".gif", ".tif", ".tiff", ".ppm"}
# The Pillow plugins re-encoding may use: the user's own files, but still no EPS/Ghostscript.
REENCODED_FORMATS = ("BMP", "GIF", "TIFF", "PPM", "JPEG", "PNG", "WEBP")


def read_image_file(path: str) -> tuple[bytes, str]:
    """(bytes, extension) ready for a shard."""
    suffix = os.path.splitext(path)[1].lower()
    with open(path, "rb") as handle:
        data = handle.read()
    if suffix in STORED_AS_IS:
        return data, STORED_AS_IS[suffix]
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data), formats=REENCODED_FORMATS).convert("RGB").save(buffer,
                                                                              format="PNG")
    return buffer.getvalue(), "png"


def imagefolder_entries(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted folder names) and (path, class index) for every image under them."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--imagefolder {root!r} is not a directory")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise ValueError(f"--imagefolder {root!r} has no class sub-folders")
    entries = []
    for index, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(os.path.join(root, name))):
            for file in sorted(files):
                if os.path.splitext(file)[1].lower() in IMAGE_SUFFIXES:
                    entries.append((os.path.join(folder, file), index))
    return classes, entries


def list_entries(list_file: str, kind: str) -> Iterator[tuple[str, int | str]]:
    """(path, label or caption) per line of ``path<TAB>value``; blank lines are skipped."""
    base = os.path.dirname(os.path.abspath(list_file))
    with open(list_file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            path, tab, value = line.partition("\t")
            if not tab:
                raise ValueError(f"{list_file}:{number}: expected 'path<TAB>{kind}', got {line!r}")
            if kind == "class":
                try:
                    value = int(value)
                except ValueError:
                    raise ValueError(f"{list_file}:{number}: class must be an integer, got "
                                     f"{value!r}") from None
            yield os.path.join(base, path), value


def shuffled(entries: list, seed: int) -> list:
    """``entries`` in a random order that depends on ``seed`` only."""
    order = np.random.default_rng(seed).permutation(len(entries))
    return [entries[i] for i in order]


def progress(items: Iterable, total: int | None, description: str) -> Iterable:
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, total=total, desc=description, unit="img", file=sys.stderr)


def write_entries(entries, kind: str, writer: ShardWriter, total: int | None) -> int:
    """Write (path, value) entries; returns the number of samples written."""
    written = 0
    for path, value in progress(entries, total, f"writing {writer.prefix} shards"):
        data, ext = read_image_file(path)
        key = f"{written:09d}"
        if kind == "class":
            writer.write(Sample(key, data, ext, label=int(value)))
        else:
            writer.write(Sample(key, data, ext, caption=str(value)))
        written += 1
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--imagefolder", help="root with one sub-folder per class")
    source.add_argument("--list", help="file of 'path<TAB>label' or 'path<TAB>caption' lines")
    parser.add_argument("--kind", choices=("class", "caption"), default="class",
                        help="what the list file's second column is (default: class)")
    parser.add_argument("--out", required=True, help="output folder for shards and index")
    parser.add_argument("--prefix", default="train", help="shard name prefix (default: train)")
    parser.add_argument("--max-samples", type=int, default=10000, help="samples per shard")
    parser.add_argument("--max-bytes", type=float, default=1e9, help="bytes per shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    parser.add_argument("--no-shuffle", action="store_true",
                        help="write the samples in input order (class after class for "
                             "--imagefolder) instead of a seeded random order")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, int]:
    args = parse_args(argv)
    with ShardWriter(args.out, args.prefix, args.max_samples, int(args.max_bytes)) as writer:
        if args.imagefolder:
            classes, entries = imagefolder_entries(args.imagefolder)
            write_class_map(args.out, classes)
            kind = "class"
        else:
            entries, kind = list(list_entries(args.list, args.kind)), args.kind
        if not args.no_shuffle:
            entries = shuffled(entries, args.seed)
        count = write_entries(entries, kind, writer, len(entries))
    if count == 0:
        raise SystemExit(f"no image found in {args.imagefolder or args.list}")
    print(f"wrote {count} samples in {len(writer.shards)} shards: {writer.pattern()}")
    return writer.shards


if __name__ == "__main__":
    main()
