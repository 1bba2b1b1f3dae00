"""Training-step benchmark of one device: DeepSpeed (ZeRO stage, bf16) with checkpointing on/off.

    python -m internimage.pretrain.bench --model internimage_h --img-size 224 --micro-batch 8,16,32

Synthetic uint8 images (no data pipeline), supervised objective, AdamW. For every micro-batch and
checkpointing setting prints one JSON line: steps/s, images/s, TFLOP/s and MFU (fvcore multiply-adds
per image × 6, peak from the device table; MFU omitted where the peak is unknown), peak memory.
A micro-batch that does not fit is reported as ``"oom": true``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

from internimage.ops import use_reference

from .metrics import device_peak_tflops, peak_memory_gib, train_tflops_per_image

__all__ = ["bench_one", "main"]


def _init_single_process() -> None:
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533")):
        os.environ.setdefault(key, value)
    cuda = get_accelerator().device_name() == "cuda"
    if cuda:
        get_accelerator().set_device(0)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")


def _cfg(args, micro_batch: int, checkpointing: bool):
    from .config import load_config
    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")
    overrides = [f"model.name={args.model}", f"model.num_classes={args.num_classes}", "model.arch={}",
                 f"model.grad_checkpointing={str(checkpointing).lower()}", f"model.dcn_reference={str(args.dcn_reference).lower()}",
                 "model.drop_path_rate=null", f"data.img_size={args.img_size}",
                 f"data.batch_size={micro_batch}", f"deepspeed.zero_stage={args.zero_stage}",
                 f"deepspeed.precision={args.precision}", "optim.base_batch_size=null"]
    return load_config(demo, overrides)


def bench_one(args, micro_batch: int, checkpointing: bool, macs: int | None) -> dict:
    """Times ``args.steps`` optimizer steps after ``args.warmup`` untimed ones."""
    from .engine import build_engine, build_module
    from .optim import set_lr
    cfg = _cfg(args, micro_batch, checkpointing)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    result = {"model": args.model, "img_size": args.img_size, "micro_batch": micro_batch,
              "checkpointing": checkpointing, "zero_stage": args.zero_stage, "precision": args.precision}
    engine = None
    try:
        torch.manual_seed(0)
        engine, optimizer = build_engine(cfg, build_module(cfg), 1)
        set_lr(optimizer, 1e-4)
        images = torch.randn(micro_batch, 3, args.img_size, args.img_size, device=device, dtype=dtype)
        target = torch.softmax(torch.randn(micro_batch, args.num_classes, device=device), dim=-1)
        label = torch.zeros(micro_batch, dtype=torch.long, device=device)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                _sync()
                t0 = time.perf_counter()
            with use_reference(args.dcn_reference):
                out = engine(image=images, target=target, label=label)
            engine.backward(out["loss"])
            engine.step()
        _sync()
        seconds = time.perf_counter() - t0
    except torch.OutOfMemoryError:
        result["oom"] = True
        return result
    finally:
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result.update(steps_per_s=args.steps / seconds, images_per_s=args.steps * micro_batch / seconds,
                  peak_memory_gib=peak_memory_gib())
    if macs:
        result["gmacs_per_image"] = macs / 1e9
        result["tflops"] = result["images_per_s"] * train_tflops_per_image(macs)
        peak = device_peak_tflops(args.peak_tflops)
        if peak:
            result["mfu"] = result["tflops"] / peak
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return result


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _macs(args) -> int:
    from internimage.model import count_flops, create_model
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = create_model(args.model, num_classes=args.num_classes)
    macs = count_flops(model, args.img_size)
    del model
    return macs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="internimage_t")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--micro-batch", default="32", help="one size or a comma-separated list")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--zero-stage", type=int, default=3, choices=(0, 1, 2, 3))
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--checkpointing", default="both", choices=("on", "off", "both"))
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device table")
    parser.add_argument("--dcn-reference", action="store_true",
                        help="run DCNv3 through the pure-PyTorch reference instead of the fused kernel")
    parser.add_argument("--no-flops", action="store_true", help="skip the fvcore count (no TFLOP/s, MFU)")
    args = parser.parse_args(argv)
    _init_single_process()
    macs = None if args.no_flops else _macs(args)
    settings = {"on": [True], "off": [False], "both": [False, True]}[args.checkpointing]
    for micro_batch in (int(b) for b in args.micro_batch.split(",")):
        for checkpointing in settings:
            print(json.dumps(bench_one(args, micro_batch, checkpointing, macs)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
