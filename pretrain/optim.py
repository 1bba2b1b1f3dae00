"""AdamW parameter groups (per-parameter LR scale × weight decay or none) and the per-step warm-up
+ cosine schedule.

Each group carries ``lr_scale``; ``set_lr`` writes ``lr = base · lr_scale`` into every group each
step. Under ZeRO-3 the optimizer DeepSpeed returns shares these group dicts with the client
optimizer, so the per-group rates take effect (tests/pretrain check it on real partitions).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Iterable

import torch
from torch import nn

__all__ = ["build_optimizer", "cosine_lr", "group_parameters", "set_lr"]


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
    """LR for optimizer step ``step`` (0-based): linear warm-up from warmup_lr to base_lr over
    ``warmup_steps``, then half-cosine from base_lr to min_lr at ``total_steps``."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Sets every group's LR to ``lr · group['lr_scale']``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
