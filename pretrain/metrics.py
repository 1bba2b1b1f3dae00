"""Observability: TensorBoard scalars and JSON lines (same numbers), progress line, MFU.

Only rank 0 writes. Throughput FLOPs follow the usual model-FLOPs convention: fvcore counts
multiply-adds per image (DCNv3 included); one multiply-add is 2 FLOPs and a training step costs
3× the forward (forward + backward ≈ 2× forward), so training FLOPs/image = 2 · 3 · MACs.
Recomputation by activation checkpointing is not counted (that would be hardware FLOPs).
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from typing import Any

import torch

__all__ = ["MetricsWriter", "ProgressLine", "device_peak_tflops", "peak_memory_gib",
           "train_tflops_per_image"]

# Dense bf16 tensor-core peak per device, TFLOP/s (vendor datasheets, no sparsity).
_PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,
    "GH200": 989.4,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.1,
    "A10G": 70.0,
    "L4": 121.0,
}


def device_peak_tflops(override: float | None = None) -> float | None:
    """Peak TFLOP/s of this process's device, or None when unknown (then MFU is not reported)."""
    if override is not None:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key in sorted(_PEAK_BF16_TFLOPS, key=len, reverse=True):  # most specific first
        if key in name:
            return _PEAK_BF16_TFLOPS[key]
    return None


def train_tflops_per_image(macs_per_image: int) -> float:
    """Training TFLOPs per image from fvcore multiply-adds (2 FLOPs each, ×3 for fwd+bwd)."""
    return 6.0 * macs_per_image / 1e12


def peak_memory_gib() -> float:
    """Peak device memory allocated (GPU) or peak resident set size of this process (CPU), GiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


class MetricsWriter:
    """Writes scalars to ``RUN_DIR/metrics.jsonl`` and TensorBoard (``RUN_DIR/tensorboard``)."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.tb = None
        self.file = None
        if not enabled:
            return
        self.file = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def write(self, step: int, scalars: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in scalars.items() if v is not None}
        self.file.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **clean}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in clean.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{kind}/{key}", value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


class ProgressLine:
    """Rank-0 console progress: a bar with ETA and the key numbers (one line per update)."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool, width: int = 24):
        self.total, self.start, self.enabled, self.width = total_steps, start_step, enabled, width
        self.t0 = time.time()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, numbers: dict[str, float]) -> None:
        if not self.enabled:
            return
        done = step / max(1, self.total)
        filled = int(self.width * done)
        elapsed = time.time() - self.t0
        rate = (step - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        shown = " ".join(f"{k} {_fmt(v)}" for k, v in numbers.items() if v is not None)
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {step}/{self.total} "
                f"{_clock(elapsed)}<{_clock(eta)} {shown}")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr,
              flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
