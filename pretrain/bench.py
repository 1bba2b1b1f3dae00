"""Training-step benchmark: DeepSpeed (ZeRO stage, bf16) with checkpointing and the speed switches on/off.

    python -m internimage.pretrain.bench --model internimage_h --img-size 224 --micro-batch 8,16,32
    python -m internimage.pretrain.bench --model internimage_h --img-size 224 --micro-batch max
    python -m internimage.pretrain.bench --model internimage_h --micro-batch 16 --checkpointing on \
        --compile both --channels-last both --tf32 on --repeat 2
    deepspeed --num_gpus 8 --no_local_rank --module internimage.pretrain.bench --micro-batch 16 ...

Each switch takes on, off or both; every combination is timed, all of them once per ``--repeat``
(A B A B: a drift of the machine shows as a difference between repeats, not between settings).
``--compile``: regional torch.compile of the blocks (``model.compile``, backend
``--compile-backend``); ``--whole-blocks``: ZeRO-3 gathers each block's parameters at once
(``deepspeed.gather_whole_blocks``, implied by compile); ``--channels-last``: the image enters
the stem in channels-last memory (``model.channels_last``); ``--tf32``: fp32 matmuls/convolutions
in TF32 on GPUs (``deepspeed.tf32``). Every row names the switches it ran with. Under the deepspeed launcher every
rank trains (ZeRO-3 across them) and rank 0 prints; steps/s and images/s are per rank.

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

import itertools

from .benchmark import Switches, bench_largest, bench_one, emit, macs_per_image
from .distributed import init_single_process, world_size

SETTINGS = {"on": [True], "off": [False], "both": [False, True]}

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
    parser.add_argument("--checkpointing", default="both", choices=tuple(SETTINGS))
    parser.add_argument("--compile", default="off", choices=tuple(SETTINGS),
                        help="regional torch.compile of the blocks (model.compile)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--whole-blocks", default="off", choices=tuple(SETTINGS),
                        help="ZeRO-3 gathers each block's parameters at once (deepspeed.gather_whole_blocks)")
    parser.add_argument("--channels-last", default="off", choices=tuple(SETTINGS),
                        help="stem input in channels-last memory (model.channels_last)")
    parser.add_argument("--tf32", default="on", choices=tuple(SETTINGS),
                        help="fp32 matmuls/convolutions in TF32 on GPUs (deepspeed.tf32)")
    parser.add_argument("--repeat", type=int, default=1, help="time every setting this many times, interleaved")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device table")
    parser.add_argument("--dcn-reference", action="store_true",
                        help="run DCNv3 through the pure-PyTorch reference instead of the fused kernel")
    parser.add_argument("--no-flops", action="store_true", help="skip the fvcore count (no TFLOP/s, MFU)")
    parser.add_argument("--gmacs", type=float, default=None,
                        help="multiply-adds per image, 1e9 (from an earlier run's gmacs_per_image): "
                             "skips the fvcore count, which takes tens of seconds for H")
    args = parser.parse_args(argv)
    init_single_process()
    if args.micro_batch == "max" and world_size() > 1:
        parser.error("--micro-batch max searches one device's memory; run it without the launcher")
    macs = macs_per_image(args)
    checkpointing_settings = SETTINGS[args.checkpointing]
    switches = _distinct(Switches(compile, compile or whole_blocks, channels_last, tf32, args.compile_backend)
                         for compile, whole_blocks, channels_last, tf32 in itertools.product(
                             SETTINGS[args.compile], SETTINGS[args.whole_blocks], SETTINGS[args.channels_last],
                             SETTINGS[args.tf32]))
    for _ in range(args.repeat):
        for checkpointing, setting in itertools.product(checkpointing_settings, switches):
            if args.micro_batch == "max":
                bench_largest(args, checkpointing, macs, setting)
                continue
            for micro_batch in (int(b) for b in args.micro_batch.split(",")):
                emit(bench_one(args, micro_batch, checkpointing, macs, setting))
    return 0


def _distinct(settings) -> list:
    """In order, each setting once (compile implies whole-block gathering: two combinations coincide)."""
    return list(dict.fromkeys(settings))


if __name__ == "__main__":
    sys.exit(main())
