"""The training-step benchmark (``python -m internimage.pretrain.bench``): DeepSpeed (ZeRO stage,
precision) on synthetic batches, activation checkpointing and the speed switches (compiled blocks,
channels-last stem input, TF32) on/off, one micro-batch or the largest that fits; on one device,
or on every rank of a launcher's group."""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Callable

import torch

from internimage.ops import use_reference

from .distributed import compute_device, is_main, precision_dtype, set_tf32, synchronize, world_size
from .engine import free_memory, release_engine
from .metrics import (device_memory_stats, device_peak_tflops, peak_memory_gib, reset_peak_memory,
                      train_tflops_per_image)

__all__ = ["Switches", "bench_largest", "bench_one", "emit", "largest_fitting", "macs_per_image"]


# The batches are synthetic; the config still names a source, as every config must.
SYNTHETIC_SOURCE = "data.train_sources=[{name: synthetic, shards: synthetic.tar, kind: class}]"


@dataclasses.dataclass(frozen=True)
class Switches:
    """The speed switches one benchmark row runs with (their config keys in ``overrides``)."""
    compile: bool = False
    whole_blocks: bool = False
    channels_last: bool = False
    tf32: bool = True
    compile_backend: str = "inductor"

    def overrides(self) -> list[str]:
        flag = {True: "true", False: "false"}
        return [f"model.compile={flag[self.compile]}", f"model.compile_backend={self.compile_backend}",
                f"deepspeed.gather_whole_blocks={flag[self.whole_blocks]}",
                f"model.channels_last={flag[self.channels_last]}", f"deepspeed.tf32={flag[self.tf32]}"]

    def row(self) -> dict:
        """The switches as a row reports them; ``whole_blocks`` as in effect (compile implies it)."""
        return {"compile": self.compile, "whole_blocks": self.whole_blocks or self.compile,
                "channels_last": self.channels_last, "tf32": self.tf32,
                **({"compile_backend": self.compile_backend} if self.compile else {})}


def _cfg(args, micro_batch: int, checkpointing: bool, switches: Switches):
    from .config import load_config
    overrides = [SYNTHETIC_SOURCE, f"model.name={args.model}", f"model.num_classes={args.num_classes}",
                 "model.arch={}", f"activation_checkpointing.enabled={str(checkpointing).lower()}",
                 f"model.dcn_reference={str(args.dcn_reference).lower()}",
                 "model.drop_path_rate=null", f"data.img_size={args.img_size}",
                 f"data.batch_size={micro_batch}", f"deepspeed.zero_stage={args.zero_stage}",
                 f"deepspeed.precision={args.precision}", "optim.base_batch_size=null", *switches.overrides()]
    return load_config(None, overrides)


def bench_one(args, micro_batch: int, checkpointing: bool, macs: int | None,
              switches: Switches = Switches()) -> dict:
    """Times ``args.steps`` optimizer steps after ``args.warmup`` untimed ones (a compiled model
    compiles in the first warm-up step). Steps/s and images/s are per rank."""
    result = {"model": args.model, "img_size": args.img_size, "micro_batch": micro_batch,
              "checkpointing": checkpointing, **switches.row(), "zero_stage": args.zero_stage,
              "precision": args.precision, "world_size": world_size()}
    engine = None
    try:
        engine = _build(args, micro_batch, checkpointing, switches)
        seconds = _timed_steps(engine, args, micro_batch)
    except RuntimeError as error:  # torch.OutOfMemoryError is one
        if not _out_of_memory(error):
            raise
        result["oom"] = True
    finally:
        release_engine(engine)
        engine = None
        free_memory()
    if torch.cuda.is_available():
        # What the engine left behind after its release: a leak would shrink every later probe.
        result["allocated_after_release_gib"] = torch.cuda.memory_allocated() / 2**30
    if result.get("oom"):
        return result
    result.update(steps_per_s=args.steps / seconds, images_per_s=args.steps * micro_batch / seconds,
                  peak_memory_gib=peak_memory_gib(), **device_memory_stats())
    if macs:
        result["gmacs_per_image"] = macs / 1e9
        result["tflops"] = result["images_per_s"] * train_tflops_per_image(macs)
        peak = device_peak_tflops(args.peak_tflops)
        if peak:
            result["mfu"] = result["tflops"] / peak
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return result


def _build(args, micro_batch: int, checkpointing: bool, switches: Switches):
    """The DeepSpeed engine, its module initialised on the device (H's 1.1 B parameters take tens
    of seconds to initialise on the CPU, and a ``max`` search builds one engine per probe)."""
    from .engine import build_engine, build_module
    from .optim import set_lr
    cfg = _cfg(args, micro_batch, checkpointing, switches)
    set_tf32(cfg.deepspeed.tf32)
    torch.manual_seed(0)
    with torch.device(compute_device()):
        module = build_module(cfg)
    engine, optimizer, _ = build_engine(cfg, module, world_size())
    set_lr(optimizer, 1e-4)
    return engine


def _timed_steps(engine, args, micro_batch: int) -> float:
    """Seconds of ``args.steps`` training steps after ``args.warmup``; the batch and the activations
    are locals, so they are gone once this returns or raises."""
    device = compute_device()
    dtype = precision_dtype(args.precision)
    images = torch.randn(micro_batch, 3, args.img_size, args.img_size, device=device, dtype=dtype)
    target = torch.softmax(torch.randn(micro_batch, args.num_classes, device=device), dim=-1)
    label = torch.zeros(micro_batch, dtype=torch.long, device=device)
    reset_peak_memory()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            synchronize()
            t0 = time.perf_counter()
        with use_reference(args.dcn_reference):
            out = engine(image=images, target=target, label=label)
        engine.backward(out["loss"])
        engine.step()
    synchronize()
    return time.perf_counter() - t0


def _out_of_memory(error: BaseException) -> bool:
    """True for the caching allocator's OOM and for libraries that report a failed allocation as a
    plain RuntimeError (cuBLAS/cuDNN workspaces, NCCL buffers)."""
    message = str(error)
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in message \
        or "ALLOC_FAILED" in message


def largest_fitting(fits: Callable[[int], bool], start: int = 8, limit: int = 4096,
                    relative: int = 8) -> int:
    """Largest micro-batch ``n`` in 1..``limit`` with ``fits(n)``, to within max(1, n // relative),
    assuming every size below a fitting one fits; 0 when 1 does not fit. Doubles from ``start``
    until the first failure (halves when ``start`` fails), then bisects strictly between the last
    fit and the first failure, so no size is tried twice."""
    if not 1 <= start <= limit:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    low, high = _bracket(fits, start, limit)
    while high - low > max(1, low // relative):
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def _bracket(fits: Callable[[int], bool], start: int, limit: int) -> tuple[int, int]:
    """(a size that fits or 0, a larger one that does not or limit + 1), at most a factor 2 apart."""
    if fits(start):
        low = start
        while low < limit:
            high = min(2 * low, limit)
            if not fits(high):
                return low, high
            low = high
        return limit, limit + 1
    high = start
    while high > 1:
        low = high // 2
        if fits(low):
            return low, high
        high = low
    return 0, 1


def bench_largest(args, checkpointing: bool, macs: int | None, switches: Switches = Switches()) -> list[dict]:
    """``--micro-batch max``: the probes' results, then the full timing of the largest that fits
    (``"largest": true``, with ``"first_oom"``, the smallest size that did not)."""
    probe_args = argparse.Namespace(**{**vars(args), "warmup": 1, "steps": 1})
    results: list[dict] = []

    def fits(micro_batch: int) -> bool:
        result = {**bench_one(probe_args, micro_batch, checkpointing, macs, switches), "probe": True}
        emit(result)
        results.append(result)
        return not result.get("oom")

    largest_fitting(fits, args.max_start, args.max_limit)
    fitting = sorted((r["micro_batch"] for r in results if not r.get("oom")), reverse=True)
    oom = [r["micro_batch"] for r in results if r.get("oom")]
    final = {"model": args.model, "img_size": args.img_size, "micro_batch": 0,
             "checkpointing": checkpointing, **switches.row(), "oom": True}
    # Largest first; the next smaller fit only if the longer run goes out of memory after all.
    for micro_batch in fitting:
        final = bench_one(args, micro_batch, checkpointing, macs, switches)
        if not final.get("oom"):
            break
    final.update(largest=True, first_oom=min(oom, default=None))
    emit(final)
    return results + [final]


def emit(result: dict) -> None:
    """One JSON line, from rank 0 only (every rank times its own steps; they run in lockstep)."""
    if is_main():
        print(json.dumps(result), flush=True)


def macs_per_image(args) -> int | None:
    """fvcore multiply-adds per image; None with ``--no-flops``, ``--gmacs`` when given."""
    if args.no_flops:
        return None
    if args.gmacs:
        return round(args.gmacs * 1e9)
    from internimage.model import count_flops, create_model
    with torch.device(compute_device()):
        model = create_model(args.model, num_classes=args.num_classes)
    macs = count_flops(model, args.img_size)
    del model
    return macs
