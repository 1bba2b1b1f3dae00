"""The training stream: weighted mixing of sources into uint8 batches, exactly resumable.

Batch n of a rank (n = 0, 1, ...) is built by worker slot n mod W (W = max(1, workers)); the
DataLoader hands batches out round-robin, so every batch has a fixed home. A slot's batches within
one virtual epoch form a *segment*; everything random in a segment is seeded by
(seed, epoch, global worker id, segment start, counter), never by wall clock or process state.
Each batch carries its slot's position after it was built, which is all a restore needs.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .config import DataConfig
from .decode import DecodeError, decode_caption, decode_class, guarded, image_bytes
from .faults import (BAD_LABEL, CORRUPT_IMAGE, MISSING_KEY, OVERSIZED, FailureRate,
                     SkipCounter)
from .shards import MemberPolicy, RawSample
from .sources import SourceReader, SourceShards, worker_assignment
from .tokenizer import Tokenizer
from .transforms import train_transform

SAMPLE_STREAM = 3
# The failure rate of a source is judged only after this many of its samples in a worker.
FAILURE_RATE_MIN_SAMPLES = 100
STATE_KEY = "_state"


@dataclass
class Layout:
    """Where a loader sits in the job: rank, world size, worker slots per rank, batches per epoch."""

    rank: int
    world_size: int
    slots: int
    steps_per_epoch: int

    def global_worker(self, slot: int) -> int:
        return self.rank * self.slots + slot

    @property
    def global_workers(self) -> int:
        return self.world_size * self.slots

    def epoch_of(self, batch: int) -> int:
        return batch // self.steps_per_epoch


def new_batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor for one batch of images.

    In a DataLoader worker it is created straight in shared memory: sending it to the main process
    then moves a handle, not 150 KB per image (``share_memory_()`` on a ``torch.empty`` would first
    fault in and copy a private buffer). In the main process it comes from numpy, whose malloc
    recycles the block from batch to batch; torch returns large blocks to the OS on every free, and
    faulting 9.6 MB back in cost 0.1-0.4 ms per 224-px image on the development VM.
    """
    if get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(math.prod(shape))
        return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
    return torch.from_numpy(np.empty(shape, dtype=np.uint8))


def slot_batches(start_batch: int, slot: int, slots: int):
    """Batch numbers >= start_batch that slot ``slot`` builds: n with n mod slots == slot."""
    first = start_batch + (slot - start_batch) % slots
    return range(first, 2**62, slots)


class TrainStream(IterableDataset):
    """Iterable of batches for one rank, from ``start_batch`` on, resuming slots from states.

    ``slot_states[s]`` is the state attached to the last batch of slot s that was handed out, or
    None. Each item is a batch dict plus ``STATE_KEY`` (the slot's position after this batch).
    """

    def __init__(self, cfg: DataConfig, sources: list[SourceShards], layout: Layout,
                 start_batch: int, slot_states: list[dict | None],
                 num_classes: int | None = None):
        self.cfg = cfg
        self.num_classes = num_classes
        self.sources = sources
        self.layout = layout
        self.start_batch = start_batch
        self.slot_states = slot_states
        weights = np.array([s.weight for s in cfg.train_sources], dtype=np.float64)
        self.weights = weights / weights.sum()
        # What Generator.choice(p=weights) searches: the same draw picks the same source.
        cumulative = np.cumsum(self.weights)
        self.cumulative_weights = (cumulative / cumulative[-1]).tolist()

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        # DataLoader worker k serves batch start_batch + k first, then every slots-th batch.
        slot = (self.start_batch + worker) % self.layout.slots
        builder = SlotBuilder(self, slot)
        for batch_number in slot_batches(self.start_batch, slot, self.layout.slots):
            yield builder.build(batch_number)


class SlotBuilder:
    """Builds the batches of one worker slot, segment after segment."""

    def __init__(self, stream: TrainStream, slot: int):
        self.stream = stream
        self.cfg = stream.cfg
        self.slot = slot
        self.global_worker = stream.layout.global_worker(slot)
        self.tokenizer = Tokenizer.from_config(self.cfg)
        saved = stream.slot_states[slot] if slot < len(stream.slot_states) else None
        self.counter = SkipCounter(counts=saved["skips"] if saved else None)
        self.saved = saved
        self.epoch = -1
        self.failure_rates = [FailureRate(self.cfg.failure_window, FAILURE_RATE_MIN_SAMPLES)
                              for _ in stream.sources]

    def build(self, batch_number: int) -> dict:
        epoch = self.stream.layout.epoch_of(batch_number)
        if epoch != self.epoch:
            self._start_segment(epoch, batch_number)
        batch = self._collect(self.cfg.batch_size)
        batch[STATE_KEY] = self._state(batch_number)
        return batch

    def _start_segment(self, epoch: int, batch_number: int) -> None:
        saved, self.saved = self.saved, None
        resume = saved is not None and saved["epoch"] == epoch
        self.epoch = epoch
        self.segment_start = saved["segment_start"] if resume else batch_number
        self.draws = saved["draws"] if resume else 0
        key = [self.cfg.seed, epoch, self.global_worker, self.segment_start]
        self.seed_key = key
        self.readers = []
        for index, source in enumerate(self.stream.sources):
            urls, stride, phase = worker_assignment(source.urls, self.global_worker,
                                                    self.stream.layout.global_workers)
            mine = dataclasses.replace(source, urls=urls, stride=stride, phase=phase)
            self.readers.append(SourceReader(
                mine, key + [index], self.cfg.shuffle_buffer, self.counter,
                saved["sources"][index] if resume else None,
                chunk_bytes=int(self.cfg.shuffle_buffer_mib * (1 << 20))))

    def _state(self, batch_number: int) -> dict:
        return {"epoch": self.epoch, "segment_start": self.segment_start, "draws": self.draws,
                "batch": batch_number, "sources": [r.state() for r in self.readers],
                "skips": dict(self.counter.counts)}

    def _collect(self, size: int) -> dict:
        batch_images = new_batch_buffer((size, self.cfg.img_size, self.cfg.img_size, 3))
        images = batch_images.numpy()
        labels = np.full(size, -1, dtype=np.int64)
        sources = np.empty(size, dtype=np.int64)
        captions: list[str | None] = [None] * size
        filled = 0
        while filled < size:
            rng = np.random.default_rng(self.seed_key + [SAMPLE_STREAM, self.draws])
            self.draws += 1
            index = bisect.bisect_right(self.stream.cumulative_weights, rng.random())
            raw = self.readers[index].next()
            decoded = self._decode(index, raw, rng)
            if decoded is None:
                continue
            images[filled], labels[filled], captions[filled] = decoded
            sources[filled] = index
            filled += 1
        # (B, 3, S, S) in channels-last memory: no transposing copy on the CPU; the device
        # side and the network's channels-last layout take it as it is.
        return {"image": batch_images.permute(0, 3, 1, 2),
                "label": torch.from_numpy(labels),
                "text": self.tokenizer.encode_batch(captions),
                "source": torch.from_numpy(sources)}

    def _decode(self, index: int, raw: RawSample, rng: np.random.Generator):
        """(image HWC uint8, label, caption) of one raw sample, or None after counting a skip.

        Whatever one sample raises is that sample's skip (webdataset's ``warn_and_continue``):
        counted under the reason of the step that failed, logged at a limited rate.
        """
        source = self.stream.sources[index]
        try:
            label, caption = guarded(BAD_LABEL, _read_target, raw, source.kind, source.policy,
                                     self.stream.num_classes)
            data = sample_image(raw, source.policy)
            pixels = guarded(CORRUPT_IMAGE, train_transform, data, self.cfg, rng)
        except DecodeError as error:
            self.counter.skip(error.reason, f"{raw.url}:{raw.key}", error)
            self._check_failure_rate(index, failed=True)
            return None
        self._check_failure_rate(index, failed=False)
        return pixels, label, caption

    def _check_failure_rate(self, index: int, failed: bool) -> None:
        rate = self.failure_rates[index]
        rate.record(failed)
        if not failed or not rate.exceeds(self.cfg.max_failure_rate):
            return
        source = self.stream.sources[index]
        found = {k: v for k, v in self.counter.counts.items() if v}
        raise RuntimeError(
            f"source {source.name!r}: {rate.failures} of the last {rate.seen} samples read from "
            f"pattern {source.pattern!r} failed to decode, more than max_failure_rate="
            f"{self.cfg.max_failure_rate} (skips in this worker: {found}); check that the shards "
            f"hold images and {'.cls' if source.kind == 'class' else '.txt'} members as "
            f"kind={source.kind!r} expects, or raise DataConfig.max_failure_rate")


def sample_image(raw: RawSample, policy: MemberPolicy) -> bytes:
    """The image member's bytes; DecodeError when it is missing or was over its size cap."""
    check_not_oversized(raw)
    data = image_bytes(raw.members, policy.image_keys)
    if data is None:
        raise DecodeError(MISSING_KEY, f"no image member (looked for {policy.image_keys})")
    return data


def check_not_oversized(raw: RawSample) -> None:
    if raw.oversized:
        raise DecodeError(OVERSIZED, f"members {raw.oversized} over their size cap, not read")


def _read_target(raw: RawSample, kind: str, policy: MemberPolicy, num_classes: int | None
                 ) -> tuple[int, str | None]:
    """Label (-1 for caption sources) and caption (None for class sources); a class id must be
    below ``num_classes`` when it is given."""
    check_not_oversized(raw)
    if kind == "class":
        data = image_bytes(raw.members, policy.class_keys)
        if data is None:
            raise DecodeError(MISSING_KEY, f"no class member {policy.class_keys} in a class "
                                           "source")
        return decode_class(data, num_classes), None
    caption = decode_caption(raw.members, policy.caption_keys)
    if caption is None:
        raise DecodeError(MISSING_KEY, f"no caption member {policy.caption_keys} in a caption "
                                       "source")
    return -1, caption
