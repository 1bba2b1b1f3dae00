"""Throughput of decode + augment + collate, beside a plain PIL baseline, on realistic JPEGs.

    python -m internimage.data.bench [--workers N] [--json PATH] [--images 512] [--img-size 224]

The bench writes ~500x375 JPEGs (quality 90, 1/f "natural" texture so file sizes and decode cost
are like photos) into a temporary shard, then measures, in images per second:

- ``baseline``: plain PIL in this process, one core: full decode, crop, bicubic resize, flip,
  to uint8 array (what a straightforward pipeline does per sample);
- ``baseline_cpu_normalise``: the same plus float conversion and normalisation on the CPU, as a
  pipeline that does not hand uint8 to the device does;
- ``loader_1core`` with and without RandAugment: this package's train loader with no worker
  process (tar read, crop-only DCT-scaled decode, crop-resize, flip, augment, collate to a
  uint8 batch; random erasing and Mixup/CutMix run later on the device); without RandAugment
  colour jitter is off as well;
- ``loader_workers`` with ``--workers`` processes (total and per worker), when N > 0.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from .config import DataConfig, SourceConfig
from .decode import jpeg_decoder_name
from .loader import build_train_loader
from .transforms import random_resized_crop_box
from .writer import Sample, ShardWriter


def natural_jpeg(seed: int, width: int = 500, height: int = 375, quality: int = 90) -> bytes:
    """A photo-like JPEG (~90 KiB): eight octaves of smooth noise whose amplitude falls slowly
    with frequency, plus sensor-like grain, so the entropy decoder has a photo's work to do."""
    rng = np.random.default_rng(seed)
    canvas = np.zeros((height, width, 3), np.float32)
    for octave in range(1, 9):
        cells = 2 ** octave
        grid = rng.normal(0, 1, (cells * height // width + 2, cells + 2, 3)).astype(np.float32)
        layer = np.stack([np.asarray(Image.fromarray(grid[..., c], "F").resize(
            (width, height), Image.Resampling.BICUBIC)) for c in range(3)], axis=-1)
        canvas += layer * (70.0 / octave ** 0.6)
    canvas += rng.normal(0, 6, canvas.shape).astype(np.float32)
    pixels = np.clip(canvas + 128, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def baseline_step(images: list[bytes], size: int, normalise: bool = False):
    """One image of a plain PIL pipeline: full decode, crop, bicubic resize, flip, to array;
    with ``normalise`` also the float conversion and mean/std a CPU-side pipeline does."""
    rng = np.random.default_rng(0)
    mean = np.array([0.485, 0.456, 0.406], np.float32) * 255
    scale = 1.0 / (np.array([0.229, 0.224, 0.225], np.float32) * 255)
    counter = iter(range(10**12))

    def step() -> int:
        data = images[next(counter) % len(images)]
        image = Image.open(io.BytesIO(data)).convert("RGB")
        left, top, w, h = random_resized_crop_box(image.width, image.height, (0.08, 1.0),
                                                  (3 / 4, 4 / 3), rng)
        image = image.crop((left, top, left + w, top + h)).resize((size, size),
                                                                  Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(image)
        if normalise:
            torch.from_numpy((pixels.astype(np.float32) - mean) * scale).permute(2, 0, 1)
        return 1
    return step


def loader_step(pattern: str, size: int, batch_size: int, workers: int, randaugment: bool):
    """One batch from ``build_train_loader``, after a warm-up batch per worker."""
    # Without RandAugment, colour jitter is off too: that run measures decode, crop, flip and
    # collation alone.
    cfg = DataConfig(train_sources=[SourceConfig("bench", pattern)], img_size=size,
                     batch_size=batch_size, workers=workers, shuffle_buffer=64,
                     epoch_samples=10**9, randaugment=randaugment, color_jitter=0.0)
    iterator = iter(build_train_loader(cfg, 0, 1))
    for _ in range(max(1, workers)):
        next(iterator)
    return lambda: next(iterator)["image"].shape[0]


def round_rates(steps: dict, seconds: float, rounds: int) -> dict[str, list[float]]:
    """Images/s of each step in each of ``rounds`` interleaved rounds of ``seconds`` each."""
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            done, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds or done == 0:
                done += step()
            rates[name].append(done / (time.perf_counter() - started))
    return rates


def best_rates(rates: dict[str, list[float]]) -> dict[str, float]:
    """Best round of each step: a neighbour's burst of load on a shared machine then favours no
    side."""
    return {name: max(values) for name, values in rates.items()}


def paired_speedup(rates: dict[str, list[float]], name: str) -> float:
    """Median over rounds of ``name``'s rate over the baseline's in the same round. On a machine
    whose speed drifts by 20 % over seconds (shared cores), the pairs cancel the drift that the
    ratio of two best rounds keeps."""
    return float(np.median(np.array(rates[name]) / np.array(rates["baseline"])))


def run(workers: int, images: int, size: int, batch_size: int, seconds: float,
        rounds: int = 12) -> dict:
    torch.set_num_threads(1)  # the in-process runs measure one core, like one worker
    with tempfile.TemporaryDirectory() as folder:
        jpegs = [natural_jpeg(seed) for seed in range(images)]
        with ShardWriter(folder, "bench", max_samples=max(1, images // 4)) as writer:
            for index, data in enumerate(jpegs):
                writer.write(Sample(f"{index:06d}", data, "jpg", label=index % 1000))
        pattern = writer.pattern()
        result = {
            "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or "unknown",
                        "pillow": Image.__version__, "jpeg_decoder": jpeg_decoder_name()},
            "images": {"count": images, "width": 500, "height": 375, "quality": 90,
                       "mean_kib": round(sum(map(len, jpegs)) / len(jpegs) / 1024, 1)},
            "img_size": size, "batch_size": batch_size, "rounds": rounds,
        }
        rates = round_rates({
            "baseline": baseline_step(jpegs, size),
            "baseline_cpu_normalise": baseline_step(jpegs, size, normalise=True),
            "loader_1core": loader_step(pattern, size, batch_size, 0, False),
            "loader_1core_randaugment": loader_step(pattern, size, batch_size, 0, True),
        }, seconds, rounds)
        result.update(best_rates(rates))
        if workers > 0:
            totals = best_rates(round_rates({
                "loader_workers": loader_step(pattern, size, batch_size, workers, False),
                "loader_workers_randaugment": loader_step(pattern, size, batch_size, workers,
                                                          True),
            }, seconds, rounds))
            for key, total in totals.items():
                result[key] = {"workers": workers, "total": total, "per_worker": total / workers}
    result["speedup_vs_baseline"] = paired_speedup(rates, "loader_1core")
    result["speedup_vs_baseline_randaugment"] = paired_speedup(rates,
                                                               "loader_1core_randaugment")
    return result


def cores_needed(train_images_per_s: float, per_core_images_per_s: float) -> int:
    """CPU cores (one worker each) that keep up with a GPU training at the given rate."""
    return math.ceil(train_images_per_s / per_core_images_per_s)


def format_result(result: dict) -> str:
    lines = [f"{result['images']['count']} JPEGs 500x375 q90, mean "
             f"{result['images']['mean_kib']} KiB -> {result['img_size']}px, batch "
             f"{result['batch_size']}, {result['machine']['cpus']} CPUs, JPEG decoder "
             f"{result['machine']['jpeg_decoder']}; img/s: best of {result['rounds']} rounds; "
             f"speed-up: median of per-round ratios",
             f"plain PIL baseline (1 core):          {result['baseline']:8.1f} img/s",
             f"  same + float normalise on the CPU:  {result['baseline_cpu_normalise']:8.1f} img/s",
             f"loader, 1 core, no RandAugment:       {result['loader_1core']:8.1f} img/s "
             f"({result['speedup_vs_baseline']:.2f}x baseline)",
             f"loader, 1 core, RandAugment m9:       {result['loader_1core_randaugment']:8.1f} "
             f"img/s ({result['speedup_vs_baseline_randaugment']:.2f}x baseline)"]
    for key, label in (("loader_workers", "no RandAugment"),
                       ("loader_workers_randaugment", "RandAugment m9")):
        if key in result:
            entry = result[key]
            lines.append(f"loader, {entry['workers']} workers, {label}: {entry['total']:8.1f} "
                         f"img/s total, {entry['per_worker']:.1f} per worker")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="loader worker processes for the multi-worker run (0: skip it)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--images", type=int, default=128, help="distinct JPEGs to generate")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=0.5,
                        help="seconds per measurement and round")
    parser.add_argument("--rounds", type=int, default=12,
                        help="interleaved rounds (more on a noisy machine)")
    args = parser.parse_args(argv)
    result = run(args.workers, args.images, args.img_size, args.batch_size, args.seconds,
                 args.rounds)
    print(format_result(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    return result


if __name__ == "__main__":
    main()
