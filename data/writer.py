"""Writing WebDataset shards plus the index (shard -> sample count) the loaders read.

Layout: ``{out}/{prefix}-{000000..}.tar``, each sample ``{key}.{jpg|png|webp}`` with ``{key}.cls``
(integer class) and/or ``{key}.txt`` (caption), and ``{out}/{prefix}-index.json``:
``{"shards": {"train-000000.tar": 1000, ...}, "total": N}``.
A new shard starts when the current one reaches ``max_samples`` samples or ``max_bytes`` bytes.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass

from .shards import INDEX_SUFFIX

TAR_MTIME = 0  # fixed, so that the same input writes byte-identical shards


@dataclass
class Sample:
    """One sample to write: image bytes in ``image_ext`` format, a class and/or a caption."""

    key: str
    image: bytes
    image_ext: str = "jpg"
    label: int | None = None
    caption: str | None = None

    def members(self) -> list[tuple[str, bytes]]:
        members = [(f"{self.key}.{self.image_ext}", self.image)]
        if self.label is not None:
            members.append((f"{self.key}.cls", f"{int(self.label)}".encode()))
        if self.caption is not None:
            members.append((f"{self.key}.txt", self.caption.encode("utf-8")))
        return members


class ShardWriter:
    """Context manager: ``write(sample)`` many times; ``close()`` finishes the last shard and the
    index. ``shards`` maps shard file name -> sample count."""

    def __init__(self, out_dir: str, prefix: str = "train", max_samples: int = 10000,
                 max_bytes: int = 1 << 30):
        if max_samples < 1 or max_bytes < 1:
            raise ValueError(f"max_samples={max_samples} and max_bytes={max_bytes} must be >= 1")
        if "-" in prefix or os.sep in prefix:
            raise ValueError(f"prefix {prefix!r} must not contain '-' or '{os.sep}' (shards are "
                             "named PREFIX-NNNNNN.tar and the index PREFIX-index.json)")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir = out_dir
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.shards: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._bytes = 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, sample: Sample) -> None:
        members = sample.members()
        size = sum(len(data) + 1024 for _, data in members)  # headers and padding, roughly
        if self._tar is None or self._count >= self.max_samples or (
                self._count > 0 and self._bytes + size > self.max_bytes):
            self._next_shard()
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._bytes += size
        self.shards[self._name] = self._count

    def _next_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
        self._name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tar = tarfile.open(os.path.join(self.out_dir, self._name), "w",
                                 format=tarfile.USTAR_FORMAT)
        self._count = self._bytes = 0
        self.shards[self._name] = 0

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        write_index(self.out_dir, self.prefix, self.shards)

    def pattern(self) -> str:
        """Brace pattern covering the written shards."""
        last = len(self.shards) - 1
        if last == 0:
            return os.path.join(self.out_dir, f"{self.prefix}-000000.tar")
        return os.path.join(self.out_dir, f"{self.prefix}-{{000000..{last:06d}}}.tar")


def write_index(out_dir: str, prefix: str, shards: dict[str, int]) -> str:
    path = os.path.join(out_dir, prefix + INDEX_SUFFIX)
    with open(path, "w") as handle:
        json.dump({"shards": shards, "total": sum(shards.values())}, handle, indent=1)
    return path


def write_class_map(out_dir: str, names: list[str]) -> str:
    """``classes.json``: the list of class names, position = class index."""
    path = os.path.join(out_dir, "classes.json")
    with open(path, "w") as handle:
        json.dump(names, handle, indent=1)
    return path
