"""Non-finite guards: a step whose gradients are not finite is skipped, never applied.

DeepSpeed checks gradients for overflow only under fp16 loss scaling; in bf16 and fp32 (before
DeepSpeed 0.19.8) a step with an ``inf`` or NaN gradient is applied, and one such step turns every
weight it touches — and the EMA after it — into NaN. The trainer therefore checks the global
gradient norm itself before each optimizer step and, when it is not finite on any rank, closes the
``StepGate`` of the client optimizer: DeepSpeed runs its step bookkeeping (clears the gradients,
moves its counters) while the weights and the optimizer moments stay exactly as they were.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .distributed import all_ranks, rank

__all__ = ["NonFiniteError", "StepGate", "gradients_finite", "tensors_finite", "unpadded"]


class NonFiniteError(RuntimeError):
    """Training cannot continue without NaN/inf (too many skipped steps, or non-finite weights)."""


class StepGate:
    """Lets the trainer veto the next ``step()`` of a torch optimizer.

    DeepSpeed calls the client optimizer's ``step`` inside its own (per ZeRO sub-group); while the
    gate is closed those calls return at once, so neither the parameters nor the optimizer state
    (moments, step count) change.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.closed = False
        self.vetoed_calls = 0
        inner_step = optimizer.step

        def gated_step(*args, **kwargs):
            if self.closed:
                self.vetoed_calls += 1
                return None
            return inner_step(*args, **kwargs)

        optimizer.step = gated_step


def unpadded(param: nn.Parameter, local: torch.Tensor) -> torch.Tensor:
    """This rank's share of ``param`` (its ZeRO-3 partition, or the whole tensor) without ZeRO-3's
    padding: partitions are ceil(numel / world) long, and the tail of the last ones is memory that
    is never written (any bit pattern, NaN included)."""
    if not hasattr(param, "ds_numel"):
        return local
    start = rank() * local.numel()
    return local.flatten()[:max(0, min(local.numel(), param.ds_numel - start))]


def _zero3_local_gradients(optimizer) -> list[torch.Tensor]:
    """This rank's fp32 gradient partitions under ZeRO-3, unpadded, read in one call: DeepSpeed
    synchronizes its reduce stream once for all of them (its per-parameter accessor does so per
    parameter, ~1,400 times a step for H) and returns views, not copies."""
    partitions = optimizer.get_fp32_grad_partitions()  # {sub-group: {index in the sub-group: grad}}
    return [unpadded(param, partitions[group][index])
            for group, params in enumerate(optimizer.fp16_groups)
            for index, param in enumerate(params) if index in partitions.get(group, {})]


def _local_gradients(module: nn.Module) -> list[torch.Tensor]:
    """This rank's share of every gradient after the backward of an accumulation boundary: the
    ZeRO-3 partition of each parameter (fp32, unpadded), else the parameter's own gradient."""
    zero3 = next((p._z3_optimizer for p in module.parameters() if hasattr(p, "_z3_optimizer")), None)
    if zero3 is not None and hasattr(zero3, "get_fp32_grad_partitions"):
        return _zero3_local_gradients(zero3)
    grads = []
    for param in module.parameters():
        if not param.requires_grad:
            continue
        if hasattr(param, "ds_id"):
            from deepspeed.utils import safe_get_local_grad
            grad = unpadded(param, safe_get_local_grad(param))
        else:
            grad = param.grad
            if grad is None:
                from deepspeed.utils import safe_get_full_grad
                grad = safe_get_full_grad(param)
        if grad is not None:
            grads.append(grad)
    return grads


def tensors_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """A 0-dim bool tensor on the tensors' device: no NaN or ±inf in any of them, without a host
    sync. The max-norm (one fused reduction per tensor) is NaN or inf exactly when an element is;
    a 2-norm would also overflow on large finite values."""
    tensors = [t.detach() for t in tensors if t.numel()]
    if not tensors:
        return torch.tensor(True)
    norms = torch._foreach_norm([t if t.is_floating_point() else t.float() for t in tensors], float("inf"))
    return torch.isfinite(torch.stack([n.float() for n in norms])).all()


def gradients_finite(module: nn.Module) -> bool:
    """True on every rank when every gradient element is finite, so the global gradient norm is
    (collective: all ranks call it, between ``engine.backward`` of an accumulation boundary and
    ``engine.step``)."""
    return all_ranks(tensors_finite(_local_gradients(module)))
