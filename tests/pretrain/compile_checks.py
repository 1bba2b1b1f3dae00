"""Run under the deepspeed launcher with 2 CPU processes: the regionally compiled image model
(``model.compile``) against the eager one, both under ZeRO-3 with activation checkpointing.

    deepspeed --num_gpus 2 --no_local_rank --module tests.pretrain.compile_checks OUT_DIR BACKEND

Both engines start from the same weights and see the same batches and stochastic-depth draws.
Writes OUT_DIR/rank{r}.json:
  logits       per step, the largest |compiled − eager| logit, relative to the largest |eager| logit
  grads        step 1's full (gathered) gradients, largest |compiled − eager| relative to the
               largest |eager| gradient of the same parameter
  weights      after the last step, the largest |compiled − eager| weight change, relative
  graphs       the compiled function's graphs after step 1 and after the last step (no recompiles)
  graph_breaks graph breaks counted by dynamo over all steps
  state_keys   the state-dict keys of both modules are the same (no ``_orig_mod.`` wrapper)
"""
from __future__ import annotations

import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

from internimage.pretrain.config import load_config
from internimage.pretrain.engine import build_engine, build_module, release_engine
from internimage.pretrain.optim import set_lr
from tests.paths import REPO

STEPS = 3
# Stage 0: a block of drop rate 0 (no factors: its own graph) and two above it (different rates,
# one graph); then one graph per stage width. Stochastic depth on, so its factors are inputs.
TINY = ["deepspeed.precision=fp32", "optim.grad_clip=0", "activation_checkpointing.enabled=true",
        "model.drop_path_rate=0.2", "data.batch_size=2", "data.img_size=32",
        "model.arch={channels: 8, depths: [3, 1, 1, 1], groups: [1, 1, 2, 2]}"]


def _cfg(*extra):
    return load_config(os.path.join(REPO, "configs", "demo.yaml"), TINY + list(extra))


def _batches(cfg, rank):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        images = torch.randn(2, cfg.data.batch_size, 3, cfg.data.img_size, cfg.data.img_size, generator=g)
        labels = torch.randint(0, 10, (2, cfg.data.batch_size), generator=g)
        out.append((images[rank], torch.nn.functional.one_hot(labels[rank], 10).float(), labels[rank]))
    return out


def _train(cfg, rank):
    """Steps of one engine: per-step logits, step 1's full gradients, the weight changes, and
    the dynamo counters after step 1 and at the end."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    module = build_module(cfg)
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    keys = sorted(module.state_dict())
    engine, optimizer, _ = build_engine(cfg, module, 2)
    set_lr(optimizer, 0.02)
    torch.manual_seed(100 + rank)  # the stochastic-depth draws: the same for both engines
    logits, grads, graphs = [], {}, []
    for step, (images, target, labels) in enumerate(_batches(cfg, rank)):
        out = engine(image=images, target=target, label=labels)
        engine.backward(out["loss"])
        if step == 0:
            grads = {n: safe_get_full_grad(p).clone() for n, p in module.named_parameters()}
        engine.step()
        logits.append(out["logits"].float())
        graphs.append(counters["stats"]["unique_graphs"])
    change = {n: safe_get_full_fp32_param(p).view(start[n].shape) - start[n] for n, p in module.named_parameters()}
    release_engine(engine)
    return logits, grads, change, keys, (graphs[0], graphs[-1])


def _relative(a: dict, b: dict) -> float:
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-12)).item() for n in b)


def main(out_dir, backend):
    from torch._dynamo.utils import counters
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    eager = _train(_cfg(), rank)
    compiled = _train(_cfg("model.compile=true", f"model.compile_backend={backend}"), rank)
    results = {
        "logits": [((c - e).abs().max() / e.abs().max()).item() for c, e in zip(compiled[0], eager[0])],
        "grads": _relative(compiled[1], eager[1]),
        "grad_total": sum(g.abs().sum().item() for g in eager[1].values()),
        "weights": _relative(compiled[2], eager[2]),
        "state_keys": compiled[3] == eager[3],
        "graphs": list(compiled[4]),
        "graph_breaks": sum(counters["graph_break"].values()),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
