"""Evaluation stream: each validation sample exactly once over all ranks, equal batch counts.

The validation set is laid out as one sequence (shards in order, samples in shard order, counts
from the shard index, or from reading the tar headers when there is none). Rank r takes the
contiguous range [r*N/R, (r+1)*N/R) and splits it among its workers the same way. Every worker
pads its last batch with invalid rows; the loader then adds whole invalid batches until it has
the largest batch count of any rank, which every rank computes alike without communicating.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .config import DataConfig
from .decode import DecodeError, decode_caption, decode_class, guarded, image_bytes
from .faults import BAD_LABEL, CORRUPT_IMAGE, TRUNCATED_TAR, SkipCounter
from .shards import check_shards_exist, expand_shards, iter_samples, shard_sample_counts
from .sources import member_policy
from .stream import sample_image
from .tokenizer import Tokenizer
from .transforms import eval_transform


@dataclass
class EvalPlan:
    """Shards with their counts, this rank's worker ranges, and the batch count of every rank."""

    urls: list[str]
    counts: list[int]
    worker_ranges: list[tuple[int, int]]
    num_batches: int


def _split(start: int, stop: int, parts: int) -> list[tuple[int, int]]:
    length = stop - start
    return [(start + length * i // parts, start + length * (i + 1) // parts) for i in range(parts)]


def eval_plan(cfg: DataConfig, rank: int, world_size: int) -> EvalPlan:
    urls = expand_shards(cfg.val_shards)
    check_shards_exist(cfg.val_shards, urls)
    counts_by_url = shard_sample_counts(urls)
    counts = [counts_by_url[url] for url in urls]
    total = sum(counts)
    if total == 0:
        raise ValueError(f"val_shards {cfg.val_shards!r}: the {len(urls)} shards hold no sample")
    workers = max(1, cfg.workers)

    def batches_of_rank(r: int) -> int:
        start, stop = _split(0, total, world_size)[r]
        return sum(-(-(b - a) // cfg.batch_size) for a, b in _split(start, stop, workers))

    start, stop = _split(0, total, world_size)[rank]
    return EvalPlan(urls, counts, _split(start, stop, workers),
                    max(batches_of_rank(r) for r in range(world_size)))


def padding_batch(cfg: DataConfig, size: int | None = None) -> dict:
    """A batch of invalid rows (zeros), shaped like a real one."""
    size = cfg.batch_size if size is None else size
    return {"image": torch.zeros(size, 3, cfg.img_size, cfg.img_size, dtype=torch.uint8),
            "label": torch.full((size,), -1, dtype=torch.int64),
            "text": torch.zeros(size, cfg.context_length, dtype=torch.int64),
            "source": torch.full((size,), -1, dtype=torch.int64),
            "valid": torch.zeros(size, dtype=torch.bool)}


class EvalStream(IterableDataset):
    """Batches of one rank's worker range; ``source`` is -1 (not a training source)."""

    def __init__(self, cfg: DataConfig, plan: EvalPlan, num_classes: int | None = None):
        self.cfg = cfg
        self.plan = plan
        self.num_classes = num_classes
        self.policy = member_policy(cfg)

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        workers = info.num_workers if info is not None else 1
        tokenizer = Tokenizer.from_config(self.cfg)
        counter = SkipCounter()
        for start, stop in self.plan.worker_ranges[worker::workers]:
            rows = []
            for row in self._samples(start, stop, counter):
                rows.append(row)
                if len(rows) == self.cfg.batch_size:
                    yield self._collate(rows, tokenizer)
                    rows = []
            if rows:
                yield self._collate(rows, tokenizer)

    def _samples(self, start: int, stop: int, counter: SkipCounter):
        """(image, label, caption, valid) for global sample indices [start, stop)."""
        offset = 0
        for url, count in zip(self.plan.urls, self.plan.counts):
            lo, hi = max(start, offset) - offset, min(stop, offset + count) - offset
            offset += count
            if lo >= hi:
                continue
            emitted = lo
            for index, raw in enumerate(iter_samples(url, counter, self.policy)):
                if index < lo:
                    continue
                if index >= hi:
                    break
                yield self._decode(raw, counter)
                emitted += 1
            if emitted < hi:  # shard shorter than its index says: keep the counts exact
                counter.skip(TRUNCATED_TAR, f"{url}: {hi - emitted} samples missing")
                for _ in range(hi - emitted):
                    yield self._invalid()

    def _invalid(self):
        size = self.cfg.img_size
        return np.zeros((size, size, 3), np.uint8), -1, None, False

    def _decode(self, raw, counter: SkipCounter):
        """(image, label, caption, True), or an invalid row after counting the sample's skip.

        As in training, whatever one sample raises is that sample's skip; a ``.cls`` that is
        present but unusable makes the row invalid (``bad_label``), a missing one gives label -1.
        """
        try:
            data = sample_image(raw, self.policy)
            label, caption = guarded(BAD_LABEL, self._target, raw)
            pixels = guarded(CORRUPT_IMAGE, eval_transform, data, self.cfg.img_size,
                             self.cfg.eval_crop_ratio, self.cfg.exif_transpose)
        except DecodeError as error:
            counter.skip(error.reason, f"{raw.url}:{raw.key}", error)
            return self._invalid()
        return pixels, label, caption, True

    def _target(self, raw) -> tuple[int, str | None]:
        data = image_bytes(raw.members, self.policy.class_keys)
        label = -1 if data is None else decode_class(data, self.num_classes)
        return label, decode_caption(raw.members, self.policy.caption_keys)

    def _collate(self, rows, tokenizer: Tokenizer) -> dict:
        batch = padding_batch(self.cfg)
        images = np.stack([row[0] for row in rows])
        batch["image"][: len(rows)] = torch.from_numpy(images).permute(0, 3, 1, 2)
        batch["label"][: len(rows)] = torch.tensor([row[1] for row in rows], dtype=torch.int64)
        batch["text"][: len(rows)] = tokenizer.encode_batch([row[2] for row in rows])
        batch["valid"][: len(rows)] = torch.tensor([row[3] for row in rows], dtype=torch.bool)
        return batch
