"""Training-step benchmark of one device: DeepSpeed (ZeRO stage, bf16) with checkpointing on/off.

    python -m internimage.pretrain.bench --model internimage_h --img-size 224 --micro-batch 8,16,32
    python -m internimage.pretrain.bench --model internimage_h --img-size 224 --micro-batch max

Synthetic uint8 images (no data pipeline), supervised objective, AdamW. For every micro-batch and
checkpointing setting prints one JSON line: steps/s, images/s, TFLOP/s and MFU (fvcore multiply-adds
per image × 6, peak from the device table; MFU omitted where the peak is unknown), peak memory.
A micro-batch that does not fit is reported as ``"oom": true``.

``--micro-batch max`` searches the largest micro-batch that fits (doubling from ``--max-start``,
then bisecting to within 1/8), one short probe per size (1 warm-up + 1 timed step: the second step
is the first with the optimizer states, so it reaches the peak), each printed with ``"probe": true``;
then times the largest with the full step count, printed last with ``"largest": true``.
"""
from __future__ import annotations

import argparse
import sys

from .benchmark import bench_largest, bench_one, emit, macs_per_image
from .distributed import init_single_process

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="internimage_t")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--micro-batch", default="32",
                        help="one size, a comma-separated list, or 'max' (largest that fits)")
    parser.add_argument("--max-start", type=int, default=8, help="'max': first size tried")
    parser.add_argument("--max-limit", type=int, default=4096, help="'max': largest size tried")
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
    parser.add_argument("--gmacs", type=float, default=None,
                        help="multiply-adds per image, 1e9 (from an earlier run's gmacs_per_image): "
                             "skips the fvcore count, which takes tens of seconds for H")
    args = parser.parse_args(argv)
    init_single_process()
    macs = macs_per_image(args)
    settings = {"on": [True], "off": [False], "both": [False, True]}[args.checkpointing]
    if args.micro_batch == "max":
        for checkpointing in settings:
            bench_largest(args, checkpointing, macs)
        return 0
    for micro_batch in (int(b) for b in args.micro_batch.split(",")):
        for checkpointing in settings:
            emit(bench_one(args, micro_batch, checkpointing, macs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
