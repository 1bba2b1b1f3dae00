"""DeepSpeed set-up: the module to train, its parameter groups and the DeepSpeed config dict."""
from __future__ import annotations

import gc
from typing import Any

import torch
from torch import nn

from internimage.model import create_model, no_weight_decay, param_lr_scales
from internimage.model.text_tower import TextTransformer

from .config import PretrainConfig
from .configio import merge_trees
from .distributed import compute_device, is_main
from .files import atomic_write_json
from .guards import StepGate
from .module import IMAGE_PREFIX, PretrainModule
from .optim import build_optimizer, group_parameters

__all__ = ["build_module", "build_engine", "deepspeed_config", "describe_deepspeed_config", "free_memory",
           "offloads_optimizer", "param_groups", "release_engine", "scaled_lr"]


def build_image_model(cfg: PretrainConfig) -> nn.Module:
    m = cfg.model
    model = create_model(m.name, num_classes=m.num_classes, pretrained=m.pretrained,
                         drop_path_rate=m.drop_path_rate, **m.arch)
    recompute = cfg.activation_checkpointing
    if recompute.enabled:
        model.set_grad_checkpointing(recompute.enabled, every=recompute.every_blocks)
    if m.channels_last:
        model.set_channels_last()
    if m.compile:
        model.compile_blocks(m.compile_backend)
    return model


def build_module(cfg: PretrainConfig, vocab_size: int | None = None) -> PretrainModule:
    """The full trainable module of ``cfg`` (image model, text tower when needed, objective)."""
    image = build_image_model(cfg)
    text = None
    if cfg.objective.kind != "supervised":
        vocab = cfg.text.vocab_size or vocab_size
        if not vocab:
            raise ValueError("the contrastive objective needs text.vocab_size or a tokenizer")
        text = TextTransformer(vocab, cfg.data.context_length, cfg.text.width, cfg.text.layers,
                               cfg.text.heads, cfg.objective.embed_dim)
    o = cfg.objective
    return PretrainModule(image, o.kind, text, o.embed_dim, o.init_temperature, o.max_logit_scale,
                          o.supervised_weight, o.contrastive_weight, o.gather_features)


def param_groups(module: PretrainModule, weight_decay: float, layer_decay: float,
                 dcn_lr_mult: float) -> list[dict]:
    """AdamW groups: the layer-wise LR scales of the image model (1.0 for the text tower and the
    temperature); the model's no-weight-decay rule for every parameter (the temperature is 0-D)."""
    image_scales = param_lr_scales(module.image, layer_decay, dcn_lr_mult)
    scales = {IMAGE_PREFIX + name: s for name, s in image_scales.items()}
    return group_parameters(module.named_parameters(), weight_decay, scales, no_weight_decay)


def scaled_lr(cfg: PretrainConfig, world_size: int) -> float:
    """Peak LR: ``optim.lr`` × global batch / ``optim.base_batch_size`` (linear scaling rule)."""
    if cfg.optim.base_batch_size is None:
        return cfg.optim.lr
    global_batch = cfg.data.batch_size * cfg.optim.grad_accum * world_size
    return cfg.optim.lr * global_batch / cfg.optim.base_batch_size


def deepspeed_config(cfg: PretrainConfig, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON config of ``cfg`` (precision, ZeRO stage, accumulation, clipping)."""
    d = cfg.deepspeed
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.zero_stage >= 2:
        zero.update(overlap_comm=d.overlap_comm, contiguous_gradients=True)
    for part in ("optimizer", "param"):
        device = getattr(d, f"offload_{part}")
        if device != "none":
            zero[f"offload_{part}"] = {"device": device, "pin_memory": True,
                                       **({"nvme_path": d.nvme_path} if device == "nvme" else {})}
    if d.zero_stage == 3:
        if d.stage3_prefetch_bucket_size is not None:
            zero["stage3_prefetch_bucket_size"] = d.stage3_prefetch_bucket_size
        if d.stage3_param_persistence_threshold is not None:
            zero["stage3_param_persistence_threshold"] = d.stage3_param_persistence_threshold
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "communication_data_type": d.grad_reduce_dtype,
    }
    if cfg.optim.grad_clip > 0:
        ds["gradient_clipping"] = cfg.optim.grad_clip
    if d.precision != "fp32":
        # Buffers (BatchNorm running statistics of the conv head) must match the low-precision
        # parameters, or batch_norm rejects the mixed dtypes.
        ds["data_types"] = {"buffer_dtype": d.precision}
    if d.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif d.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": d.fp16_initial_scale_power,
                      "loss_scale_window": d.fp16_loss_scale_window, "hysteresis": 2,
                      "min_loss_scale": 1}
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    # Layers: the user's JSON (config_file) under ours, extra over both; neither may set what the
    # YAML owns (checked when the config is loaded).
    return merge_trees(merge_trees(d.user_json(), ds), d.extra)


def offloads_optimizer(ds: dict) -> bool:
    """Whether this DeepSpeed config keeps the optimizer states off the device (ours or the user's
    JSON): DeepSpeed then steps on the CPU and wants its CPU Adam."""
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


def describe_deepspeed_config(ds: dict, world_size: int) -> str:
    """One line: what DeepSpeed was given (printed at start; the whole of it is ds_config.json)."""
    zero = ds.get("zero_optimization", {})
    enabled = [name for name in ("bf16", "fp16") if ds.get(name, {}).get("enabled")]
    precision = enabled[0] if enabled else "fp32"
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    offload = [k for k in ("offload_optimizer", "offload_param") if zero.get(k)]
    return (f"DeepSpeed: ZeRO-{zero.get('stage', 0)}, {precision}, micro-batch {micro} × accumulation {accum} × "
            f"{world_size} ranks = {micro * accum * world_size} per step, gradient clipping "
            f"{ds.get('gradient_clipping', 'off')}, reduce in {ds.get('communication_data_type')}"
            + (f", {' and '.join(offload)}" if offload else ""))


def build_engine(cfg: PretrainConfig, module: PretrainModule, world_size: int,
                 load_universal: bool = False, config_out: str | None = None):
    """``deepspeed.initialize`` on ``module`` with our AdamW groups; returns (engine, optimizer,
    the ``StepGate`` that can veto the optimizer's next step). ``config_out``: where rank 0 writes
    the DeepSpeed config it passes (and prints a one-line summary)."""
    import deepspeed

    ds = deepspeed_config(cfg, load_universal)
    groups = param_groups(module, cfg.optim.weight_decay, cfg.optim.layer_decay, cfg.optim.dcn_lr_mult)
    client = build_optimizer(groups, tuple(cfg.optim.betas), cfg.optim.eps, compute_device().type,
                             cpu_offload=offloads_optimizer(ds))
    gate = StepGate(client)
    if cfg.deepspeed.zero_stage == 3:
        register_borrowed_parameters(module)
        if cfg.deepspeed.gather_whole_blocks or cfg.model.compile:
            _gather_blocks_whole(module)
    if config_out is not None and is_main():
        atomic_write_json(config_out, ds)
        print(describe_deepspeed_config(ds, world_size) + f" (all of it: {config_out})", flush=True)
    engine, optimizer, _, _ = deepspeed.initialize(model=module, optimizer=client, config=ds)
    return engine, optimizer, gate


def register_borrowed_parameters(module: nn.Module) -> None:
    """ZeRO-3 gathers a parameter in the forward of the module that owns it. A module whose forward
    reads a submodule's parameters itself (DCNv3's one GEMM on the packed offset and mask weights)
    lists them in ``borrowed_parameters()``; registered as its external parameters they are gathered,
    prefetched and released with it. (DeepSpeed also registers such a parameter when it finds it
    unavailable on first access, but not one whose prefetch is still in flight then: the GEMM would
    read a buffer being written.)"""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter
    for submodule in module.modules():
        if hasattr(submodule, "borrowed_parameters"):
            for parameter in submodule.borrowed_parameters():
                register_external_parameter(submodule, parameter)


def _gather_blocks_whole(module: nn.Module) -> None:
    """ZeRO-3 gathers each block's parameters in the block's own forward hook, all at once
    (DeepSpeed's "leaf module"), and none of its submodules carries hooks. A compiled block needs
    it: ZeRO-3's per-submodule hooks are ``torch.compiler.disable``d, so each would break the
    block's graph. Before ``deepspeed.initialize``, which installs the hooks."""
    from deepspeed.utils import set_z3_leaf_modules

    from internimage.model.internimage import InternImageBlock
    set_z3_leaf_modules(module, [InternImageBlock])


def release_engine(engine) -> None:
    """Frees a DeepSpeed engine's module, optimizer and their device memory after its last use
    (DeepSpeed expects one engine per process; benchmarks and fine-tuning stages make several).

    Drops what keeps a ZeRO-3 engine alive: the engine's hooks, closures over both; DeepSpeed's
    global forward-module stack, which holds the top module from the engine's start on and, after
    an exception inside a forward, the submodules it was in; and the class-level ``lru_cache`` of
    the parameter coordinator's release sets (keyed by coordinator and submodule, from the second
    step on). ``engine`` may be None (nothing was built). Drop your own references to the engine,
    then call ``free_memory()``."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    if engine is not None:
        engine.destroy()
    parameter_offload.FWD_MODULE_STACK.clear()
    # The cached method sits under DeepSpeed's NVTX wrapper, in its closure.
    wrapper = PartitionedParameterCoordinator._PartitionedParameterCoordinator__params_to_release
    for cell in wrapper.__closure__ or ():
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()


def free_memory() -> None:
    """Collects released engines (the engine, optimizer and hooks reference each other: only the
    collector frees them) and returns their cached device memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
