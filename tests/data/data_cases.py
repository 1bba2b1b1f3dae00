"""Small synthetic shards for the data tests: tiny JPEGs whose labels say where they came from."""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np
from PIL import Image

from internimage.data import DataConfig, SourceConfig
from internimage.data.writer import Sample, ShardWriter


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 32), quality: int = 90) -> bytes:
    """A small smooth RGB JPEG whose content depends on ``seed``."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_class_shards(out_dir: str, shards: int, per_shard: int, prefix: str = "train",
                       label_of=lambda shard, index: shard) -> str:
    """``shards`` shards of ``per_shard`` class samples; returns the brace pattern."""
    with ShardWriter(out_dir, prefix, max_samples=per_shard) as writer:
        for shard in range(shards):
            for index in range(per_shard):
                seed = shard * 1000 + index
                writer.write(Sample(f"s{shard:03d}_{index:04d}", jpeg_bytes(seed), "jpg",
                                    label=label_of(shard, index)))
    return writer.pattern()


def write_caption_shards(out_dir: str, shards: int, per_shard: int, prefix: str = "train") -> str:
    with ShardWriter(out_dir, prefix, max_samples=per_shard) as writer:
        for shard in range(shards):
            for index in range(per_shard):
                writer.write(Sample(f"c{shard:03d}_{index:04d}",
                                    jpeg_bytes(50000 + shard * 1000 + index), "jpg",
                                    caption=f"caption {shard} {index}"))
    return writer.pattern()


def small_config(sources: list[SourceConfig], **overrides) -> DataConfig:
    """A fast config: 16-pixel images, batch 4, no worker processes unless asked."""
    values = dict(train_sources=sources, img_size=16, batch_size=4, workers=0, shuffle_buffer=8,
                  epoch_samples=0, seed=1)
    values.update(overrides)
    return DataConfig(**values)


def take(loader, count: int) -> list[dict]:
    """The next ``count`` batches of an endless loader."""
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def shard_paths(pattern_dir: str, prefix: str = "train") -> list[str]:
    return sorted(os.path.join(pattern_dir, name) for name in os.listdir(pattern_dir)
                  if name.startswith(prefix + "-") and name.endswith(".tar"))


def write_tar(path: str, members: list[tuple[str, bytes]]) -> str:
    """A plain tar holding ``members`` (name, content) in order: any content, hostile included."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def class_members(key: str, label: int | bytes, seed: int = 0) -> list[tuple[str, bytes]]:
    """The members of one class sample: a small JPEG and its .cls (raw bytes when given)."""
    cls = label if isinstance(label, bytes) else str(label).encode()
    return [(f"{key}.jpg", jpeg_bytes(seed)), (f"{key}.cls", cls)]
