"""Loader factories the engine calls: ``build_train_loader`` and ``build_eval_loader``.

Train state and resume
----------------------
``TrainLoader.state_dict()`` is {seed, world_size, slots, batch_size, batches (handed out by this
rank), slot_states (each slot's position after its last handed-out batch)}. Restored at the same
world size, worker count and batch size, the next batches are bit-identical to an uninterrupted
run. With another layout, the loader continues deterministically at the batch implied by the saved
global sample count (batches x batch_size x world_size), so the virtual epoch and step numbering
stay continuous; the streams then restart from fresh seeded positions, not the old layout's.
"""
from __future__ import annotations

import logging

from torch.utils.data import DataLoader

from .config import DataConfig
from .eval_stream import EvalStream, eval_plan, padding_batch
from .faults import REASONS
from .shards import check_shards_exist, expand_shards, read_sample_counts
from .sources import SourceShards, member_policy
from .stream import STATE_KEY, Layout, TrainStream
from .worker_signals import leave_job_signals_to_the_rank

LOGGER = logging.getLogger("internimage.data")


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")


def _check_num_classes(num_classes: int | None) -> None:
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1 (or None: class ids unchecked)")


def resolve_sources(cfg: DataConfig) -> list[SourceShards]:
    """Expand every source's pattern; fail now on patterns that name nothing."""
    sources = []
    for source in cfg.train_sources:
        urls = expand_shards(source.shards)
        check_shards_exist(source.shards, urls)
        sources.append(SourceShards(source.name, source.kind, source.shards, urls,
                                    member_policy(cfg, source)))
    return sources


def epoch_samples(cfg: DataConfig, sources: list[SourceShards]) -> int:
    """``cfg.epoch_samples``, or when 0 the total of the sources' shard indexes."""
    if cfg.epoch_samples > 0:
        return cfg.epoch_samples
    total = 0
    for source in sources:
        counts = read_sample_counts(source.urls)
        if counts is None:
            raise ValueError(f"epoch_samples=0 asks for the shards' sample counts, but source "
                             f"{source.name!r} ({source.pattern!r}) has no size file for every "
                             "shard (PREFIX-index.json from write_shards, open_clip's sizes.json "
                             "or img2dataset's SHARD_stats.json beside local shards); set "
                             "DataConfig.epoch_samples")
        total += sum(counts.values())
    return total


class TrainLoader:
    """Endless iterator of training batches for one rank (see the module docstring for state).

    ``iter(loader)`` is the loader itself, so a ``for`` loop that breaks after
    ``steps_per_epoch`` batches and a later ``for`` loop continue one stream with the same
    worker processes.

    Batches: ``image`` uint8 (B, 3, S, S) stored channels-last; ``label`` int64 (B,) (-1: no class); ``text`` int64
    (B, context_length) (all 0: no caption); ``source`` int64 (B,) index into train_sources.
    """

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, state: dict | None = None,
                 num_classes: int | None = None):
        cfg.validate()
        _check_rank(rank, world_size)
        _check_num_classes(num_classes)
        self.cfg = cfg
        self.num_classes = num_classes
        self.sources = resolve_sources(cfg)
        self.epoch_samples = epoch_samples(cfg, self.sources)
        self.steps_per_epoch = max(1, self.epoch_samples // (cfg.batch_size * world_size))
        self.layout = Layout(rank, world_size, max(1, cfg.workers), self.steps_per_epoch)
        self.batches = 0
        self.slot_states: list[dict | None] = [None] * self.layout.slots
        self._loader_iter = None
        if state is not None:
            self._restore(state)

    @property
    def epoch(self) -> int:
        """Virtual epoch of the next batch."""
        return self.batches // self.steps_per_epoch

    def _same_layout(self, state: dict) -> bool:
        return (state["world_size"] == self.layout.world_size
                and state["slots"] == self.layout.slots
                and state["batch_size"] == self.cfg.batch_size
                and state["seed"] == self.cfg.seed)

    def _restore(self, state: dict) -> None:
        if self._same_layout(state):
            self.batches = state["batches"]
            self.slot_states = [dict(s) if s else None for s in state["slot_states"]]
            return
        consumed = state["batches"] * state["batch_size"] * state["world_size"]
        self.batches = consumed // (self.cfg.batch_size * self.layout.world_size)
        LOGGER.warning("data loader state from another layout (world %d, workers %d, batch %d, "
                       "seed %d): continuing at batch %d from %d consumed samples, with fresh "
                       "stream positions", state["world_size"], state["slots"],
                       state["batch_size"], state["seed"], self.batches, consumed)

    def state_dict(self) -> dict:
        """Position after the last batch handed out; plain types, safe for torch.save."""
        return {"seed": self.cfg.seed, "world_size": self.layout.world_size,
                "slots": self.layout.slots, "batch_size": self.cfg.batch_size,
                "batches": self.batches,
                "slot_states": [dict(s) if s else None for s in self.slot_states]}

    def skip_counts(self) -> dict[str, int]:
        """Skipped samples per reason, summed over this rank's workers, since the run began."""
        totals = {reason: 0 for reason in REASONS}
        for state in self.slot_states:
            for reason, count in (state or {}).get("skips", {}).items():
                totals[reason] = totals.get(reason, 0) + count
        return totals

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict:
        """The next batch; worker processes start on the first call and then stay up."""
        if self._loader_iter is None:
            dataset = TrainStream(self.cfg, self.sources, self.layout, self.batches,
                                  list(self.slot_states), self.num_classes)
            loader = DataLoader(dataset, batch_size=None, num_workers=self.cfg.workers,
                                prefetch_factor=2 if self.cfg.workers else None,
                                pin_memory=self.cfg.pin_memory, worker_init_fn=leave_job_signals_to_the_rank,
                                timeout=self.cfg.batch_timeout_s if self.cfg.workers else 0)
            self._loader_iter = iter(loader)
        batch = _next_batch(self._loader_iter, self.cfg.batch_timeout_s)
        self.slot_states[self.batches % self.layout.slots] = batch.pop(STATE_KEY)
        self.batches += 1
        return batch

    def close(self) -> None:
        """Stop the worker processes (they also stop when the loader is garbage-collected)."""
        self._loader_iter = None


def _next_batch(batches, timeout_s: float) -> dict:
    try:
        return next(batches)
    except RuntimeError as exc:
        if "timed out" not in str(exc):
            raise
        raise TimeoutError(
            f"no batch from the data loader workers for {timeout_s:g} s (data.batch_timeout_s): a worker "
            "is stuck in a read no other timeout covers (a hung filesystem or storage mount) or in a decode. "
            "Check the shards' storage; raise data.batch_timeout_s if filling the shuffle buffers takes "
            "longer.") from None


def build_train_loader(cfg: DataConfig, rank: int, world_size: int,
                       state: dict | None = None, num_classes: int | None = None) -> TrainLoader:
    """The training loader of one rank; ``state`` is a previous ``state_dict()`` to resume.

    ``num_classes``: the model head's class count; a ``.cls`` id at or above it is a skipped
    ``bad_label`` sample (None: any id in int64's range is kept).
    """
    return TrainLoader(cfg, rank, world_size, state, num_classes)


class EvalLoader:
    """Finite iterator over the validation shards, the same number of batches on every rank.

    Batches as in training plus ``valid`` bool (B,); rows and whole batches added to even out the
    ranks (or standing in for a sample that failed to decode) have ``valid`` False.
    """

    def __init__(self, cfg: DataConfig, rank: int, world_size: int,
                 num_classes: int | None = None):
        _check_rank(rank, world_size)
        _check_num_classes(num_classes)
        self.num_classes = num_classes
        if not cfg.val_shards:
            raise ValueError("build_eval_loader needs DataConfig.val_shards (a shard pattern)")
        self.cfg = cfg
        self.plan = eval_plan(cfg, rank, world_size)
        self.num_batches = self.plan.num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        dataset = EvalStream(self.cfg, self.plan, self.num_classes)
        workers = min(self.cfg.workers, len(self.plan.worker_ranges))
        loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                            prefetch_factor=2 if workers else None,
                            worker_init_fn=leave_job_signals_to_the_rank,
                            timeout=self.cfg.batch_timeout_s if workers else 0)
        produced = 0
        batches = iter(loader)
        while True:
            try:
                batch = _next_batch(batches, self.cfg.batch_timeout_s)
            except StopIteration:
                break
            produced += 1
            yield batch
        for _ in range(self.num_batches - produced):
            yield padding_batch(self.cfg)


def build_eval_loader(cfg: DataConfig, rank: int, world_size: int,
                      num_classes: int | None = None) -> EvalLoader:
    """Evaluation loader of one rank: every val sample once over all ranks, equal batch counts.

    ``num_classes`` as in ``build_train_loader``: a class id outside the head is an invalid row.
    """
    return EvalLoader(cfg, rank, world_size, num_classes)

