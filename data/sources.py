"""One worker's resampled, chunk-shuffled view of one training source, with an exact position.

Shard order: a worker owns every G-th shard of the source (G = ranks x workers, global worker id
g). With fewer shards S than workers, worker g reads shard g mod S and keeps every k-th sample of it
(k: the number of workers sharing that shard, phase g div S), so in both cases every sample belongs
to exactly one worker per pass and worker loads differ by at most one shard. A worker walks its
shards in passes, each pass a fresh permutation seeded by (seed, epoch, g, segment, source, pass).
The stream never ends, so a rank can never run out of data before the others.

Shuffling is by chunks: ``shuffle_buffer`` consecutive samples are read, permuted by an RNG seeded
by the chunk number, and handed out. Unlike a running buffer this has a tiny exact position (where
the chunk began, which chunk, how far into it), so a restore re-reads one chunk (seeking to it in a
local uncompressed shard; a stream or compressed shard is read from its start up to the chunk)
instead of replaying the epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .config import DataConfig, SourceConfig
from .faults import SkipCounter
from .shards import DEFAULT_POLICY, MemberPolicy, RawSample, iter_samples

PASS_STREAM = 1
CHUNK_STREAM = 2


@dataclass
class SourceShards:
    """A source's shards as one worker sees them, and which members of them are read.

    ``stride`` / ``phase``: of each shard the worker keeps the samples whose index in the shard
    is ``phase`` modulo ``stride`` (1 / 0: all of them)."""

    name: str
    kind: str
    pattern: str
    urls: list[str]
    policy: MemberPolicy = DEFAULT_POLICY
    stride: int = 1
    phase: int = 0


def member_policy(cfg: DataConfig, source: SourceConfig | None = None) -> MemberPolicy:
    """The members a source's samples are read with (``source`` None: the default keys, as for
    the validation shards), capped by the config's sizes."""
    keys = {}
    if source is not None:
        keys = {name: tuple(key.lower() for key in getattr(source, name))
                for name in ("image_keys", "class_keys", "caption_keys")}
    return MemberPolicy(**keys, max_image_bytes=int(cfg.max_image_mib * (1 << 20)),
                        max_text_bytes=int(cfg.max_text_kib * (1 << 10)),
                        read_timeout_s=cfg.read_timeout_s)


def worker_shards(urls: list[str], global_worker: int, global_workers: int) -> list[str]:
    """The shards global worker ``global_worker`` of ``global_workers`` reads (see
    ``worker_assignment``)."""
    return worker_assignment(urls, global_worker, global_workers)[0]


def worker_assignment(urls: list[str], global_worker: int, global_workers: int
                      ) -> tuple[list[str], int, int]:
    """(shards, stride, phase) of global worker g of G: which shards it reads and which of their
    samples it keeps (index mod stride == phase).

    At least G shards: round-robin, every G-th shard, all samples. Fewer (S < G): shard g mod S,
    shared by the k workers g' = g mod S (mod S), each keeping every k-th sample from g div S.
    Either way each sample is one worker's per pass; costs O(S / G) per worker, no I/O.
    """
    shards = len(urls)
    if shards >= global_workers:
        return urls[global_worker::global_workers], 1, 0
    shard = global_worker % shards
    sharing = len(range(shard, global_workers, shards))
    return [urls[shard]], sharing, global_worker // shards


class SourceReader:
    """Endless sample stream of one source in one worker, restorable from ``state()``."""

    def __init__(self, shards: SourceShards, seed_key: list[int], shuffle_buffer: int,
                 counter: SkipCounter, state: dict | None = None,
                 chunk_bytes: int = 512 << 20):
        self.shards = shards
        self.seed_key = seed_key
        self.chunk_size = max(1, shuffle_buffer)
        self.chunk_bytes = max(1, chunk_bytes)
        self.counter = counter
        state = state or {"chunk_start": [0, 0, 0, 0], "chunk": 0, "offset": 0}
        # pass, position in pass, sample in shard, byte offset of that sample (0: unknown; a
        # 3-element cursor from an older state reads its shard from the beginning)
        self._cursor = list(state["chunk_start"]) + [0] * (4 - len(state["chunk_start"]))
        self._raw = self._read_from(*self._cursor)
        self._chunk_index = state["chunk"]
        self._chunk: list[RawSample] = []
        self._offset = 0
        self._chunk_start = list(self._cursor)
        if state["offset"] > 0:
            # Rebuild the chunk exactly as it was; its faults were counted before the save.
            was_enabled, counter.enabled = counter.enabled, False
            try:
                self._fill_chunk()
            finally:
                counter.enabled = was_enabled
            self._offset = state["offset"]

    def state(self) -> dict:
        """Plain-type position: the next sample handed out is the same after a restore."""
        if self._offset < len(self._chunk):
            return {"chunk_start": list(self._chunk_start), "chunk": self._chunk_index,
                    "offset": self._offset}
        next_chunk = self._chunk_index + 1 if self._chunk else self._chunk_index
        return {"chunk_start": list(self._cursor), "chunk": next_chunk, "offset": 0}

    def next(self) -> RawSample:
        if self._offset >= len(self._chunk):
            if self._chunk:
                self._chunk_index += 1
            self._fill_chunk()
        sample = self._chunk[self._offset]
        self._offset += 1
        return sample

    def _fill_chunk(self) -> None:
        """Read the next chunk: ``chunk_size`` samples, or fewer once they hold ``chunk_bytes``
        (sizes are part of the data, so a restore rebuilds the same chunk)."""
        self._chunk_start = list(self._cursor)
        chunk: list[RawSample] = []
        held = 0
        while len(chunk) < self.chunk_size and held < self.chunk_bytes:
            chunk.append(next(self._raw))
            held += chunk[-1].nbytes
        rng = np.random.default_rng(self.seed_key + [CHUNK_STREAM, self._chunk_index])
        self._chunk = [chunk[i] for i in rng.permutation(len(chunk))]
        self._offset = 0

    def _shard_order(self, pass_index: int) -> np.ndarray:
        rng = np.random.default_rng(self.seed_key + [PASS_STREAM, pass_index])
        return rng.permutation(len(self.shards.urls))

    def _read_from(self, pass_index: int, position: int, skip: int, offset: int
                   ) -> Iterator[RawSample]:
        """Samples from (pass, position in pass, sample in shard at byte offset) on, forever."""
        # A pass entered mid-way (after a restore) may legitimately have nothing left to read.
        partial_pass = position > 0 or skip > 0
        stride = self.shards.stride
        while True:
            order = self._shard_order(pass_index)
            yielded_in_pass = read_in_pass = 0
            while position < len(order):
                url = self.shards.urls[order[position]]
                for sample in iter_samples(url, self.counter, self.shards.policy,
                                           (skip, offset)):
                    self._cursor = [pass_index, position, sample.index + 1, sample.end_offset]
                    read_in_pass += 1
                    if sample.index % stride != self.shards.phase:
                        continue  # another worker's sample of a shared shard
                    yielded_in_pass += 1
                    yield sample
                skip = offset = 0
                position += 1
                self._cursor = [pass_index, position, 0, 0]
            if yielded_in_pass == 0 and read_in_pass > 0 and not partial_pass:
                raise RuntimeError(
                    f"source {self.shards.name!r}: shard {self.shards.urls[0]!r} holds "
                    f"{read_in_pass} samples but is shared by {stride} workers, and this one "
                    f"(share {self.shards.phase} of {stride}) gets none; write more, smaller "
                    "shards (write_shards --max-samples) or use fewer ranks x workers")
            if yielded_in_pass == 0 and not partial_pass:
                found = {k: v for k, v in self.counter.counts.items() if v}
                raise RuntimeError(
                    f"source {self.shards.name!r}: no sample could be read from any of the "
                    f"{len(self.shards.urls)} shards of pattern {self.shards.pattern!r} this "
                    f"worker reads (first: {self.shards.urls[0]!r}); skips so far: {found}")
            partial_pass = False
            pass_index += 1
            position = 0
            self._cursor = [pass_index, 0, 0, 0]
