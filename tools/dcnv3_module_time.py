"""Forward + backward time of one DCNv3 module (model/dcnv3.py) per InternImage stage, on the CPU.

For A/B runs of two checkouts: run this file with each checkout's Python, interleaved, and compare
the JSON lines (the module's API is the same in both).

    python tools/dcnv3_module_time.py --model internimage_t --img-size 64 --batch 8 --repeats 20

Per stage: channels C, groups G, side of the feature map, median ms of forward + backward (fp32,
grads of input and parameters), and the bytes of the offset/mask activation (N·H·W·G·27 floats),
which one GEMM on packed weights writes once instead of two GEMMs writing it in two tensors.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from internimage.model import DCNv3, create_model


def stage_shapes(model_name: str, img_size: int) -> list[tuple[int, int, int]]:
    """(channels, groups, side) of each stage's DCNv3 modules."""
    model = create_model(model_name)
    shapes = []
    for level, stride in zip(model.levels, (4, 8, 16, 32)):
        dcn = next(m for m in level.modules() if isinstance(m, DCNv3))
        shapes.append((dcn.channels, dcn.groups, img_size // stride))
    return shapes


def time_module(channels: int, groups: int, side: int, batch: int, repeats: int) -> float:
    torch.manual_seed(0)
    module = DCNv3(channels, groups)
    with torch.no_grad():  # offsets and mask start at zero; move them as training does
        for p in module.parameters():
            p.normal_(std=0.1)
    x = torch.randn(batch, side, side, channels, requires_grad=True)
    times = []
    for step in range(repeats + 3):
        start = time.perf_counter()
        module(x).square().mean().backward()
        if step >= 3:  # warm-up: allocator, thread pool
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="internimage_t")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--label", default="", help="copied into each line (e.g. before/after)")
    args = parser.parse_args()
    for stage, (channels, groups, side) in enumerate(stage_shapes(args.model, args.img_size)):
        ms = time_module(channels, groups, side, args.batch, args.repeats)
        offset_mask_bytes = args.batch * side * side * groups * 27 * 4
        print(json.dumps({"label": args.label, "model": args.model, "img_size": args.img_size, "batch": args.batch,
                          "stage": stage + 1, "channels": channels, "groups": groups, "side": side,
                          "fwd_bwd_ms": round(ms, 3), "offset_mask_bytes": offset_mask_bytes,
                          "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
