"""EMA of the fp32 master weights that never gathers the model: each rank averages its own shard.

Under ZeRO-3 a rank owns a contiguous slice of every flattened parameter (``ds_tensor``); its fp32
master copy lives in the optimizer. The EMA keeps an fp32 twin of exactly that slice, updates it
after every optimizer step, saves it per rank, and can be swapped into the live partitions for
evaluation. Without ZeRO-3 (stages 0–2) every rank simply keeps the full fp32 EMA.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn

from .distributed import gather_rows, rank, world_size

__all__ = ["ShardedEMA", "assemble_full_ema", "local_master_fp32"]


def _is_zero3(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def local_master_fp32(param: nn.Parameter) -> torch.Tensor:
    """This rank's fp32 master of ``param``: its ZeRO-3 slice (1-D) or the full tensor."""
    if _is_zero3(param):
        from deepspeed.utils import safe_get_local_fp32_param
        return safe_get_local_fp32_param(param)
    from deepspeed.utils import safe_get_full_fp32_param
    full = safe_get_full_fp32_param(param)
    return full if full is not None else param.detach().float()


class ShardedEMA:
    """shadow ← decay·shadow + (1−decay)·master, per rank, for every trainable parameter.

    ``module`` is the DeepSpeed-wrapped module (``engine.module``); create after
    ``deepspeed.initialize`` so the partitions and fp32 masters exist.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.buffers = dict(module.named_buffers())
        self.shadow = {n: local_master_fp32(p).detach().clone() for n, p in self.params}
        self.shadow_buffers = {n: b.detach().clone() for n, b in self.buffers.items()}
        self.updates = 0
        self._master_views: list[torch.Tensor] | None = None

    def _masters(self) -> list[torch.Tensor]:
        """This rank's fp32 masters, in ``self.params`` order. Under ZeRO-3 without offloading they
        are views into DeepSpeed's flat fp32 partitions, which live as long as the engine: looked up
        once (at the first update, after any checkpoint load), not 1,357 lookups per step for H.
        Copies (offloaded or gathered masters) are fetched anew every step."""
        if self._master_views is not None:
            return self._master_views
        masters = [local_master_fp32(p) for _, p in self.params]
        if all(m._base is not None and m.dtype == torch.float32 for m in masters):
            self._master_views = masters
        return [m.float() for m in masters]

    @torch.no_grad()
    def update(self) -> None:
        """Call after each optimizer step: one fused lerp over every shadow tensor."""
        torch._foreach_lerp_(list(self.shadow.values()), self._masters(), 1.0 - self.decay)
        for name, buf in self.buffers.items():
            self.shadow_buffers[name].copy_(buf)  # running statistics follow the model
        self.updates += 1

    def state_dict(self) -> dict:
        meta = {n: {"numel": int(getattr(p, "ds_numel", p.numel())),
                    "shape": list(getattr(p, "ds_shape", p.shape)), "zero3": _is_zero3(p)}
                for n, p in self.params}
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow,
                "buffers": self.shadow_buffers, "meta": meta}

    def load_state_dict(self, state: dict) -> None:
        """Loads this rank's own saved shard (same world size)."""
        for name, _ in self.params:
            if name not in state["shadow"]:
                raise KeyError(f"EMA state has no entry for parameter '{name}'")
            saved = state["shadow"][name]
            if saved.shape != self.shadow[name].shape:
                raise ValueError(f"EMA shard of '{name}' has shape {tuple(saved.shape)}, expected "
                                 f"{tuple(self.shadow[name].shape)}; resume at another world size "
                                 "goes through load_resharded")
            self.shadow[name].copy_(saved)
        for name, buf in state.get("buffers", {}).items():
            if name in self.shadow_buffers:
                self.shadow_buffers[name].copy_(buf)
        self.updates = int(state.get("updates", 0))

    def load_resharded(self, full_state: dict[str, torch.Tensor], updates: int) -> None:
        """Loads full fp32 EMA tensors (name → tensor of the parameter's shape) into this rank's
        slices, whatever world size wrote them."""
        for name, param in self.params:
            full = full_state[name].float().flatten()
            if _is_zero3(param):
                size = self.shadow[name].numel()
                start = _partition_start(param)
                chunk = full[start:start + size]
                padded = torch.zeros(size)
                padded[:chunk.numel()] = chunk
                self.shadow[name].copy_(padded)
            else:
                self.shadow[name].copy_(full.view_as(self.shadow[name]))
        for name, buf in full_state.items():
            if name in self.shadow_buffers:
                self.shadow_buffers[name].copy_(buf)
        self.updates = updates

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily replaces the live (partitioned) weights by the EMA, e.g. for evaluation."""
        saved, saved_full = {}, {}
        with torch.no_grad():
            for name, param in self.params:
                target = param.ds_tensor if _is_zero3(param) else param.data
                saved[name] = target.detach().clone()
                flat = self.shadow[name].flatten()
                target.view(-1)[:flat.numel()].copy_(flat.to(target.dtype))
                if _is_persistent(param):
                    # Small ZeRO-3 parameters stay gathered between steps: swap their full copy too
                    # (they are below the persistence threshold, so gathering them is cheap).
                    saved_full[name] = param.data.detach().clone()
                    param.data.copy_(_gather_shard(self.shadow[name], param).to(param.dtype))
            saved_buffers = {n: b.detach().clone() for n, b in self.buffers.items()}
            for name, buf in self.buffers.items():
                buf.copy_(self.shadow_buffers[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params:
                    target = param.ds_tensor if _is_zero3(param) else param.data
                    target.copy_(saved[name])
                    # A persistent parameter may have been released meanwhile: then the next
                    # gather reads the restored shard anyway.
                    if name in saved_full and param.data.numel() == saved_full[name].numel():
                        param.data.copy_(saved_full[name].view_as(param.data))
                for name, buf in self.buffers.items():
                    buf.copy_(saved_buffers[name])


def _is_persistent(param: nn.Parameter) -> bool:
    return _is_zero3(param) and getattr(param, "ds_persist", False) and param.data.numel() == param.ds_numel


def _gather_shard(shard: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    return gather_rows(shard)[:param.ds_numel].view(param.ds_shape)


def _partition_start(param: nn.Parameter) -> int:
    """Offset of this rank's slice in the flattened parameter (ZeRO-3 pads to world·ceil(n/world))."""
    return rank() * math.ceil(param.ds_numel / world_size())


def assemble_full_ema(shards: list[dict]) -> tuple[dict[str, torch.Tensor], int]:
    """Joins the per-rank EMA shards (``ShardedEMA.state_dict()`` of each rank, in rank order)
    into full tensors, name → parameter shape.

    Returns (tensors including buffers, number of EMA updates)."""
    first = shards[0]
    full: dict[str, torch.Tensor] = {}
    for name, meta in first["meta"].items():
        if meta["zero3"]:
            flat = torch.cat([s["shadow"][name].flatten() for s in shards])[:meta["numel"]]
            full[name] = flat.view(meta["shape"]).clone()
        else:
            full[name] = first["shadow"][name].clone()
    full.update({n: b.clone() for n, b in first["buffers"].items()})
    return full, int(first["updates"])
