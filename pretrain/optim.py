"""AdamW parameter groups (per-parameter LR scale × weight decay or none) and the warm-up + cosine
schedule, counted in samples so that a run resumed at another world size keeps its course.

Each group carries ``lr_scale``; ``set_lr`` writes ``lr = base · lr_scale`` into every group each
step. Under ZeRO-3 the optimizer DeepSpeed returns shares these group dicts with the client
optimizer, so the per-group rates take effect (tests/pretrain check it on real partitions).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

__all__ = ["Schedule", "build_optimizer", "cosine_lr", "group_parameters", "set_lr"]


def group_parameters(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                     lr_scales: dict[str, float] | None,
                     no_decay: Callable[[str, torch.Tensor], bool]) -> list[dict]:
    """Splits parameters into groups of equal (lr_scale, weight_decay).

    ``lr_scales`` maps parameter name → LR multiplier (missing names get 1.0). Returns
    torch-optimizer group dicts with keys params, weight_decay, lr_scale and names.
    """
    lr_scales = lr_scales or {}
    buckets: dict[tuple[float, float], dict] = defaultdict(lambda: {"params": [], "names": []})
    for name, param in named_params:
        if not param.requires_grad:
            continue
        wd = 0.0 if no_decay(name, param) else weight_decay
        scale = float(lr_scales.get(name, 1.0))
        bucket = buckets[(scale, wd)]
        bucket["params"].append(param)
        bucket["names"].append(name)
    groups = []
    for (scale, wd), bucket in sorted(buckets.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        groups.append({"params": bucket["params"], "names": bucket["names"], "weight_decay": wd,
                       "lr_scale": scale, "lr": 0.0})
    return groups


def build_optimizer(groups: list[dict], betas: tuple[float, float], eps: float,
                    device_type: str, cpu_offload: bool = False) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (their own LR scale and weight decay): DeepSpeed's CPU Adam when ZeRO
    offloads the optimizer states, else apex's fused Adam if importable on GPU, else DeepSpeed's
    fused Adam on GPU, else torch AdamW (CPU)."""
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, betas=betas, eps=eps, adamw_mode=True)
    if device_type == "cuda":
        try:
            from apex.optimizers import FusedAdam as ApexFusedAdam  # optional, never installed by us
            return ApexFusedAdam(groups, betas=betas, eps=eps, adam_w_mode=True)
        except ImportError:
            from deepspeed.ops.adam import FusedAdam
            return FusedAdam(groups, betas=betas, eps=eps, adam_w_mode=True)
    return torch.optim.AdamW(groups, betas=betas, eps=eps)


def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float,
              warmup_lr: float) -> float:
    """LR at position ``step`` (0-based): linear warm-up from warmup_lr to base_lr over
    ``warmup_steps``, then half-cosine from base_lr to min_lr at ``total_steps``. The three share
    one unit: optimizer steps, or samples as ``Schedule`` passes them."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """The run's length and warm-up in samples (images over all ranks).

    The config gives them in epochs or optimizer steps; both are read at ``schedule_batch``, the
    global batch (images per optimizer step) of the run's first start, which every checkpoint keeps.
    A run resumed at another world size therefore keeps its length, warm-up and LR curve: only the
    number of steps left changes. The peak LR follows the current global batch (``scaled_lr``).
    """
    total_samples: int
    warmup_samples: int
    schedule_batch: int

    @classmethod
    def from_config(cls, schedule, epoch_samples: int, schedule_batch: int) -> "Schedule":
        """``schedule``: the ``ScheduleConfig``; ``epoch_samples``: images per epoch over all ranks."""
        steps_per_epoch = max(1, epoch_samples // schedule_batch)  # the data loader drops the last partial batch
        total_steps = schedule.total_steps or max(1, math.ceil(schedule.epochs * steps_per_epoch))
        warmup_steps = schedule.warmup_steps if schedule.warmup_steps is not None \
            else round(schedule.warmup_epochs * steps_per_epoch)
        return cls(total_steps * schedule_batch, warmup_steps * schedule_batch, schedule_batch)

    def lr(self, samples: int, peak_lr: float, min_lr: float, warmup_lr: float) -> float:
        """The LR of the optimizer step that starts after ``samples`` images."""
        return cosine_lr(samples, self.total_samples, self.warmup_samples, peak_lr, min_lr, warmup_lr)

    def steps_left(self, samples: int, global_batch: int) -> int:
        """Optimizer steps of ``global_batch`` images until the run's length is reached."""
        return max(0, math.ceil((self.total_samples - samples) / global_batch))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Sets every group's LR to ``lr · group['lr_scale']``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
