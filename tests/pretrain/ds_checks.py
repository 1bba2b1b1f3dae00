"""Run under the deepspeed launcher with 2 CPU processes; compares ZeRO-3 against plain PyTorch.

    deepspeed --num_gpus 2 --no_local_rank --module tests.pretrain.ds_checks OUT_DIR   (from the repository root)

Writes OUT_DIR/rank{r}.json with, per check, the largest deviation from the plain reference:
  llrd_ratio_error  per element, (ZeRO-3 update with LLRD + DCN groups) / (update with one LR)
                    vs the parameter's expected LR scale, relative; offload_llrd_*: the same with
                    the optimizer offloaded to the CPU (DeepSpeed's CPU Adam)
  ckpt_grads    ZeRO-3 gradients with per-block activation checkpointing vs without
  ema           sharded EMA after 3 steps vs a plain EMA of the full fp32 weights
  ema_swap      logits with the EMA swapped into the partitions vs a plain model holding the EMA
  clip_gather   CLIP loss with features gathered over 2 ranks vs one process on the joint batch
"""
from __future__ import annotations

import copy
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

from internimage.pretrain.config import load_config
from internimage.pretrain.ema import ShardedEMA
from internimage.pretrain.engine import build_engine, build_module
from internimage.pretrain.objectives import clip_loss
from internimage.pretrain.optim import set_lr
from tests.paths import REPO

TINY = ["deepspeed.precision=fp32", "optim.grad_clip=0", "model.dcn_reference=true",
        "model.arch={channels: 8, depths: [1, 1, 1, 1], groups: [1, 1, 2, 2]}"]


def _cfg(*extra):
    return load_config(os.path.join(REPO, "configs", "demo.yaml"), TINY + list(extra))


def _batches(cfg, n, seed=1):
    """The same n global batches on every rank: (images (2B,3,S,S), soft targets (2B,10))."""
    g = torch.Generator().manual_seed(seed)
    b, s = cfg.data.batch_size, cfg.data.img_size
    out = []
    for _ in range(n):
        images = torch.randn(2 * b, 3, s, s, generator=g)
        labels = torch.randint(0, 10, (2 * b,), generator=g)
        out.append((images, torch.nn.functional.one_hot(labels, 10).float(), labels))
    return out


def _local(t, rank, b):
    return t[rank * b:(rank + 1) * b]


def _fresh(cfg):
    torch.manual_seed(0)
    return build_module(cfg)


def _engine_step(cfg, module, batch, lr, rank):
    from internimage.ops import use_reference
    engine, optimizer, _ = build_engine(cfg, module, 2)
    set_lr(optimizer, lr)
    b = cfg.data.batch_size
    images, target, labels = batch
    with use_reference():
        out = engine(image=_local(images, rank, b), target=_local(target, rank, b),
                     label=_local(labels, rank, b), text=None)
    engine.backward(out["loss"])
    return engine, optimizer


def _ds_update(cfg, batch, rank, lr):
    """Full fp32 parameter change of one ZeRO-3 step from the fixed initialisation."""
    module = _fresh(cfg)
    init = {n: p.detach().clone() for n, p in module.named_parameters()}
    engine, _ = _engine_step(cfg, module, batch, lr, rank)
    engine.step()
    return {n: safe_get_full_fp32_param(p).view(init[n].shape) - init[n]
            for n, p in module.named_parameters()}


def check_llrd(rank, *extra, prefix="llrd"):
    """Adam's step is proportional to the LR, so with equal gradients the update of each parameter
    under LLRD groups must be its LR scale times its update under one LR."""
    from internimage.model import param_lr_scales
    decayed = _cfg("optim.layer_decay=0.5", "optim.dcn_lr_mult=0.1", *extra)
    batch = _batches(decayed, 1)[0]
    scaled = _ds_update(decayed, batch, rank, 0.05)
    uniform = _ds_update(_cfg("optim.layer_decay=1.0", "optim.dcn_lr_mult=1.0", *extra), batch, rank, 0.05)
    expected = param_lr_scales(_fresh(decayed).image, 0.5, 0.1)
    worst, scales_seen = 0.0, set()
    for name, update in scaled.items():
        scale = expected.get(name[len("image."):], 1.0) if name.startswith("image.") else 1.0
        scales_seen.add(round(scale, 6))
        moved = uniform[name].abs() > 1e-5
        if moved.any():
            ratio = update[moved] / uniform[name][moved]
            worst = max(worst, (ratio - scale).abs().max().item() / scale)
    return {f"{prefix}_ratio_error": worst, f"{prefix}_distinct_scales": len(scales_seen)}


def check_llrd_offloaded(rank):
    """The same with ZeRO-Offload: DeepSpeed's CPU Adam steps our groups on the CPU."""
    return check_llrd(rank, "deepspeed.offload_optimizer=cpu", prefix="offload_llrd")


def check_checkpointing(rank):
    grads = []
    for flag in ("false", "true"):
        cfg = _cfg(f"activation_checkpointing.enabled={flag}")
        module = _fresh(cfg)
        engine, _ = _engine_step(cfg, module, _batches(cfg, 1)[0], 0.01, rank)
        grads.append({n: safe_get_full_grad(p).clone() for n, p in module.named_parameters()})
        engine.step()
    dev = max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0])
    nonzero = sum(float(g.abs().sum()) for g in grads[0].values())
    return {"ckpt_grads": dev, "ckpt_grad_total": nonzero}


def check_local_gradients(rank):
    """The gradient guard reads every partition in one DeepSpeed call; it must see exactly what
    DeepSpeed's per-parameter accessor gives, with and without the optimizer offloaded."""
    from deepspeed.utils import safe_get_local_grad
    from internimage.pretrain.guards import _local_gradients, unpadded
    results = {}
    for name, extra in (("local_grads", ()), ("offload_local_grads", ("deepspeed.offload_optimizer=cpu",))):
        cfg = _cfg(*extra)
        module = _fresh(cfg)
        engine, optimizer = _engine_step(cfg, module, _batches(cfg, 1)[0], 0.01, rank)
        zero3 = next(p._z3_optimizer for p in module.parameters())
        expected = [unpadded(p, safe_get_local_grad(p)) for group in zero3.fp16_groups for p in group]
        ours = _local_gradients(module)
        assert [g.numel() for g in ours] == [g.numel() for g in expected]
        results[name] = max((a - b).abs().max().item() for a, b in zip(ours, expected) if a.numel())
        results[f"{name}_total"] = sum(float(g.abs().sum()) for g in ours)
        engine.step()
    return results


def check_ema(rank):
    from internimage.ops import use_reference
    cfg = _cfg()
    module = _fresh(cfg)
    plain_model = copy.deepcopy(module)
    engine, optimizer, _ = build_engine(cfg, module, 2)
    ema = ShardedEMA(engine.module, decay=0.5)
    reference = {n: safe_get_full_fp32_param(p).clone() for n, p in module.named_parameters()}
    b = cfg.data.batch_size
    for images, target, labels in _batches(cfg, 3):
        set_lr(optimizer, 0.02)
        with use_reference():
            out = engine(image=_local(images, rank, b), target=_local(target, rank, b),
                         label=_local(labels, rank, b))
        engine.backward(out["loss"])
        engine.step()
        ema.update()
        for n, p in module.named_parameters():
            reference[n].mul_(0.5).add_(safe_get_full_fp32_param(p), alpha=0.5)
    dev = 0.0
    for name, param in module.named_parameters():
        parts = [torch.empty_like(ema.shadow[name]) for _ in range(2)]
        dist.all_gather(parts, ema.shadow[name].contiguous())
        full = torch.cat(parts)[:param.ds_numel].view(param.ds_shape)
        dev = max(dev, (full - reference[name]).abs().max().item())
    # Evaluate with the EMA swapped in vs a plain model holding the EMA weights.
    images = _batches(cfg, 1, seed=7)[0][0][:4]
    plain_model.load_state_dict({**{n: reference[n] for n in reference},
                                 **{n: b_.float() for n, b_ in ema.shadow_buffers.items()}})
    plain_model.eval()
    engine.eval()
    with torch.no_grad(), use_reference():
        with ema.swapped_in():
            swapped = engine(image=images, evaluate=True)["logits"]
        after = engine(image=images, evaluate=True)["logits"]
        expected = plain_model(image=images, evaluate=True)["logits"]
    live_differs = (after - swapped).abs().max().item()
    return {"ema": dev, "ema_swap": (swapped - expected).abs().max().item(),
            "ema_live_differs": live_differs}


def check_clip_gather(rank):
    g = torch.Generator().manual_seed(3)
    image, text = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    valid = torch.tensor([True, True, False, True, True, True, True, False])
    scale = torch.tensor(7.0)
    whole_i, whole_t = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
    # One process holding the joint batch is the reference (its "world" is this process's group,
    # so compute it through the single-rank path by detaching from the distributed helpers).
    expected = _single_process_clip(whole_i, whole_t, scale, valid)
    expected.backward()
    local_i = image[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
    local_t = text[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
    loss = clip_loss(local_i, local_t, scale, valid[rank * 4:(rank + 1) * 4], gather=True)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    # DeepSpeed averages gradients over ranks: the averaged local loss must equal the joint loss.
    grad_dev = max((local_i.grad / 2 - whole_i.grad[rank * 4:(rank + 1) * 4]).abs().max().item(),
                   (local_t.grad / 2 - whole_t.grad[rank * 4:(rank + 1) * 4]).abs().max().item())
    return {"clip_gather": abs(total.item() / 2 - expected.item()), "clip_gather_grad": grad_dev}


def _single_process_clip(image, text, scale, valid):
    image = torch.nn.functional.normalize(image, dim=-1)
    text = torch.nn.functional.normalize(text, dim=-1)
    idx = valid.nonzero().flatten()
    logits = scale * image[idx] @ text[idx].t()
    labels = torch.arange(len(idx))
    return 0.5 * (torch.nn.functional.cross_entropy(logits, labels)
                  + torch.nn.functional.cross_entropy(logits.t(), labels))


def main(out_dir):
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    results = {}
    for check in (check_clip_gather, check_llrd, check_llrd_offloaded, check_checkpointing, check_ema,
                  check_local_gradients):
        results.update(check(rank))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
