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
import uuid
from typing import Any

import torch

from internimage.data import DataConfig, Tokenizer
from internimage.data.caption_sample import caption_token_statistics, first_captions

from .config import WandbConfig
from .distributed import compute_device
from .files import atomic_write_text

__all__ = ["MetricsWriter", "ProgressLine", "device_memory_stats", "device_peak_tflops", "log_caption_tokens",
           "peak_memory_gib", "peak_tflops_of", "reset_peak_memory", "train_tflops_per_image"]

# Dense bf16 tensor-core peak per device, TFLOP/s (vendor datasheets, no sparsity), keyed by a
# part of the name torch.cuda.get_device_name() reports ("NVIDIA H200", "NVIDIA B200", ...); the
# longest key found in the name wins, so "H200 NVL" beats "H200" and "H200" beats "H20".
_PEAK_BF16_TFLOPS = {
    "GB200": 2500.0,
    "B200": 2250.0,
    "B100": 1750.0,
    "H200 NVL": 835.0,
    "H200": 989.4,
    "H800": 989.4,
    "H20": 148.0,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,
    "GH200": 989.4,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.1,
    "L40": 181.0,
    "A10G": 70.0,
    "L4": 121.0,
}


def device_peak_tflops(override: float | None = None) -> float | None:
    """Peak TFLOP/s of this process's device, or None when unknown (then MFU is not reported)."""
    if override is not None:
        return override
    if compute_device().type != "cuda":
        return None
    return peak_tflops_of(torch.cuda.get_device_name())


def peak_tflops_of(device_name: str) -> float | None:
    """Dense bf16 peak TFLOP/s of a device called ``device_name``, None when not in the table."""
    for key in sorted(_PEAK_BF16_TFLOPS, key=len, reverse=True):  # most specific first
        if key in device_name:
            return _PEAK_BF16_TFLOPS[key]
    return None


def train_tflops_per_image(macs_per_image: int) -> float:
    """Training TFLOPs per image from fvcore multiply-adds (2 FLOPs each, ×3 for fwd+bwd)."""
    return 6.0 * macs_per_image / 1e12


def peak_memory_gib() -> float:
    """Peak device memory allocated (GPU) since the last ``reset_peak_memory()``, or the peak
    resident set size of this process (CPU), GiB."""
    if compute_device().type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def device_memory_stats() -> dict[str, float]:
    """GPU memory of this process since the last reset, GiB: peak allocated (tensors), peak
    reserved (the caching allocator's share of the device, what runs out first) and the
    allocator's retries (cudaMalloc failures it recovered from by flushing its cache: a sign of
    fragmentation near the limit). Empty on the CPU."""
    if compute_device().type != "cuda":
        return {}
    stats = torch.cuda.memory_stats()
    return {"max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            "alloc_retries": stats.get("num_alloc_retries", 0)}


def reset_peak_memory() -> None:
    """Starts a new peak-memory window (GPU; the CPU's peak RSS cannot be reset)."""
    if compute_device().type == "cuda":
        torch.cuda.reset_peak_memory_stats()


class MetricsWriter:
    """Writes scalars to ``RUN_DIR/metrics.jsonl``, TensorBoard (``RUN_DIR/tensorboard``) and, with
    ``wandb.enabled``, Weights & Biases (the run ``config`` dict as its config).

    ``resumed_at``: the step the run continues from. Records written after it by the interrupted
    run are dropped from the file and TensorBoard, so a resumed run's curves have each step once;
    W&B keeps what it received, and steps it already has are not sent again.
    """

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool, resumed_at: int = 0,
                 wandb: WandbConfig | None = None, config: dict | None = None):
        self.enabled = enabled
        self.tb = None
        self.file = None
        self.wandb = None
        if not enabled:
            return
        path = os.path.join(run_dir, "metrics.jsonl")
        if resumed_at and os.path.exists(path):
            _drop_records_after(path, resumed_at)
        self.file = open(path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: TensorBoard hides the events at and after it from the earlier run.
            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"),
                                    purge_step=resumed_at + 1 if resumed_at else None)
        if wandb is not None and wandb.enabled:
            try:
                self.wandb = start_wandb_run(run_dir, wandb, config)
            except Exception as exc:  # noqa: BLE001 - a W&B outage must not stop the run (or leave
                # the other ranks waiting at their first collective); the files have every number
                print(f"W&B could not start ({type(exc).__name__}: {exc}); metrics go to metrics.jsonl "
                      "and TensorBoard only", file=sys.stderr, flush=True)
            else:
                # W&B takes steps in rising order only: a resumed run's first steps may be there already.
                self.wandb_from_step = self.wandb.step

    def write(self, step: int, scalars: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in scalars.items() if v is not None}
        self.file.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **clean}) + "\n")
        self.file.flush()
        numbers = {f"{kind}/{key}": value for key, value in clean.items()
                   if isinstance(value, (int, float)) and math.isfinite(value)}
        if self.tb is not None:
            for tag, value in numbers.items():
                self.tb.add_scalar(tag, value, step)
            self.tb.flush()
        if self.wandb is not None and step >= self.wandb_from_step:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


WANDB_RUN_FILE = "wandb_run.json"


def start_wandb_run(run_dir: str, cfg: WandbConfig, config: dict | None):
    """The W&B run of this run folder, files under ``RUN_DIR/wandb``: a new one the first time,
    after that the one whose id ``RUN_DIR/wandb_run.json`` keeps (a resumed run goes on in it)."""
    import wandb

    id_file = os.path.join(run_dir, WANDB_RUN_FILE)
    if os.path.exists(id_file):
        with open(id_file) as f:
            run_id = json.load(f)["id"]
    else:
        run_id = uuid.uuid4().hex[:16]
        atomic_write_text(id_file, json.dumps({"id": run_id}) + "\n")
    run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group, tags=cfg.tags or None,
                     name=cfg.name or os.path.basename(os.path.abspath(run_dir)), mode=cfg.mode,
                     dir=run_dir, id=run_id, resume="allow")
    if config:
        run.config.update(config, allow_val_change=True)  # a resumed run may change its overrides
    return run


def log_caption_tokens(writer: MetricsWriter, step: int, cfg: DataConfig, tokenizer: Tokenizer) -> None:
    """Once at start (rank 0): tokens per caption and the share cut at ``context_length``, measured
    on the first captions of the caption sources; printed and written as ``tokens/*``."""
    stats = caption_token_statistics(tokenizer, first_captions(cfg))
    if not stats:
        return
    print(f"captions: {stats['mean_tokens']:.1f} tokens on average (start and end included), "
          f"{stats['truncated_share']:.1%} cut at context_length={tokenizer.context_length}; "
          f"{tokenizer.kind} tokenizer, {stats['captions']} captions of the first shards", flush=True)
    writer.write(step, stats, kind="tokens")


def _drop_records_after(path: str, step: int) -> None:
    """Rewrites ``path`` (JSON lines) without the records of steps after ``step``."""
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(kept))


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
