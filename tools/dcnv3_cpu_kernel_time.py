"""The CPU DCNv3 kernel alone (``internimage.ops._cpu.forward``), one call's time over 200 calls:
InternImage-T stage 2 at 96 px, micro-batch 8 (12², C 128, G 8), mask softmax on. Runs in a
checkout from before the packed offset_mask (separate offset and mask) and after, for A/B runs:

    OMP_NUM_THREADS=1 python tools/dcnv3_cpu_kernel_time.py
"""
import time

import torch

from internimage import ops
from internimage.ops import _cpu

N, SIDE, C, G = 8, 12, 128, 8
PARAMS = (3, 3, 1, 1, 1, 1, 1, 1, G, 1.0, False, True)  # kernel, stride, pad, dilation, G, scale, centre, softmax


def main() -> None:
    torch.manual_seed(0)
    value = torch.randn(N, SIDE, SIDE, C)
    offset, mask = torch.randn(N, SIDE, SIDE, G * 18), torch.randn(N, SIDE, SIDE, G * 9)
    packed = hasattr(ops, "pack_offset_mask")
    if packed:
        offset_mask = ops.pack_offset_mask(offset, mask, G).contiguous()
        def call():
            return _cpu.forward(value, offset_mask, *PARAMS)
    else:
        def call():
            return _cpu.forward(value, offset, mask, *PARAMS)
    times = []
    for _ in range(200):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    print("after (packed)" if packed else "before (separate)",
          f"ms: min {times[0]:.3f} p10 {times[20]:.3f} p50 {times[100]:.3f}")


if __name__ == "__main__":
    main()
