"""The checkpointed state of a run, defined once.

A checkpoint holds, besides DeepSpeed's own shards of weights and optimizer:

- ``RunState`` (``trainer_state.json``, written by rank 0): the loop's ``Progress``, the world size
  and schedule length it ran with, whether it kept an EMA, and the resolved config.
- ``RankState`` (``rank_NNNNN.pt``, one per rank): that rank's data-loader position, its
  ``RandomState`` and its EMA shard.

Each part has ``state_dict()`` / ``load_state_dict()`` (or ``to_json``/``from_json``); where the
files lie is ``checkpoint.py``'s business, and it is their only reader.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["Progress", "RandomState", "RankState", "RunState"]


@dataclass
class Progress:
    """Where the loop is: what it needs to continue exactly."""
    step: int = 0  # optimizer steps done
    samples: int = 0  # images consumed over all ranks (finite micro-batches of applied steps)
    skipped_steps: int = 0  # micro-batches (non-finite loss) and steps (non-finite gradient) dropped
    nonfinite_streak: int = 0

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, int(state[f.name]))


class RandomState:
    """Every random stream of a rank: torch (CPU and the current GPU), numpy, Python, and the
    generator of the on-device augmentation (on the compute device).

    The state holds tensors and plain types only, so a rank file loads with
    ``torch.load(weights_only=True)``: numpy's (name, uint32 keys, pos, has_gauss, cached) tuple is
    kept as a dict with the keys as an int64 tensor."""

    def __init__(self, device_generator: torch.Generator):
        self.device_generator = device_generator

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        numpy_state = {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
        version, internal, gauss_next = random.getstate()
        state = {"torch": torch.get_rng_state(), "numpy": numpy_state,
                 "python": (int(version), tuple(int(v) for v in internal), gauss_next),
                 "device_generator": self.device_generator.get_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        numpy_state = state["numpy"]
        if isinstance(numpy_state, dict):
            numpy_state = (numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32),
                           numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"])
        np.random.set_state(numpy_state)  # a tuple: a rank file written before the dict form
        random.setstate(tuple(state["python"]))
        self.device_generator.set_state(state["device_generator"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


@dataclass
class RunState:
    """``trainer_state.json``: one per checkpoint."""
    progress: Progress
    world_size: int
    total_steps: int
    ema: bool  # the run kept an EMA (every rank file holds its shard)
    config: dict = field(default_factory=dict)  # the resolved config, as saved in RUN_DIR/config.yaml
    # The global batch the schedule's steps and epochs are read in: the run's first start's
    # (optim.Schedule). None: a checkpoint from before it was kept; its own global batch stands in.
    schedule_batch: Optional[int] = None

    @property
    def step(self) -> int:
        return self.progress.step

    def to_json(self) -> dict[str, Any]:
        return {**self.progress.state_dict(), "world_size": self.world_size,
                "total_steps": self.total_steps, "ema": self.ema, "config": self.config,
                "schedule_batch": self.schedule_batch}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunState":
        progress = Progress()
        progress.load_state_dict(data)
        return cls(progress, int(data["world_size"]), int(data["total_steps"]), bool(data["ema"]),
                   data.get("config", {}), data.get("schedule_batch"))

    def run_schedule_batch(self) -> Optional[int]:
        """``schedule_batch``, or for an older checkpoint the global batch it was written at."""
        if self.schedule_batch is not None:
            return self.schedule_batch
        batch_size = self.config.get("data", {}).get("batch_size")
        accum = self.config.get("optim", {}).get("grad_accum", 1)
        return int(batch_size) * int(accum) * self.world_size if batch_size else None


@dataclass
class RankState:
    """``rank_NNNNN.pt``: one per rank and checkpoint."""
    loader: dict
    rng: dict
    ema: Optional[dict] = None

    def to_dict(self) -> dict[str, Any]:
        return {"loader": self.loader, "rng": self.rng, "ema": self.ema}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RankState":
        return cls(data["loader"], data["rng"], data.get("ema"))
