"""Shared helpers for the DCNv3 operator tests: random problems in docs/model.md §4's layout."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from internimage.ops import extension
from internimage.ops.reference import output_size


@dataclass(frozen=True)
class Problem:
    """One DCNv3 core configuration; ``make`` draws fresh random inputs for it."""
    batch: int = 2
    height: int = 7
    width: int = 9
    groups: int = 2
    depth: int = 4
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    pad: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    offset_scale: float = 1.0
    remove_center: bool = False
    offset_spread: float = 2.0  # std of the offsets, in input pixels
    softmax_mask: bool = False  # mask holds logits (drawn with std 2), softmaxed inside the op
    extra: dict = field(default_factory=dict)

    @property
    def points(self) -> int:
        return self.kernel[0] * self.kernel[1] - int(self.remove_center)

    @property
    def out_hw(self) -> tuple[int, int]:
        return (output_size(self.height, self.kernel[0], self.stride[0], self.pad[0], self.dilation[0]),
                output_size(self.width, self.kernel[1], self.stride[1], self.pad[1], self.dilation[1]))

    def kwargs(self) -> dict:
        return dict(kernel_size=self.kernel, stride=self.stride, pad=self.pad, dilation=self.dilation,
                    groups=self.groups, offset_scale=self.offset_scale, remove_center=self.remove_center,
                    softmax_mask=self.softmax_mask)

    def make(self, dtype=torch.float64, device="cpu", generator_seed: int = 0, off_integer: bool = False):
        """(value, offset, mask) drawn fresh. ``off_integer`` keeps offsets' fractional parts in
        [0.1, 0.9]: bilinear sampling has kinks at integer locations, where the reference's
        one-sided derivative may legitimately differ from a kernel's (coarse bf16/fp16 offsets hit
        integers often)."""
        gen = torch.Generator().manual_seed(generator_seed)
        h_out, w_out = self.out_hw
        value = torch.randn(self.batch, self.height, self.width, self.groups * self.depth, generator=gen,
                            dtype=torch.float64)
        offset = torch.randn(self.batch, h_out, w_out, self.groups * self.points * 2, generator=gen,
                             dtype=torch.float64) * self.offset_spread
        mask = torch.rand(self.batch, h_out, w_out, self.groups * self.points, generator=gen,
                          dtype=torch.float64)
        if self.softmax_mask:
            mask = torch.randn(mask.shape, generator=gen, dtype=torch.float64) * 2
        if off_integer:
            offset = offset.floor() + 0.1 + 0.8 * torch.rand(offset.shape, generator=gen, dtype=torch.float64)
        return tuple(t.to(device=device, dtype=dtype) for t in (value, offset, mask))


def require_cpu_kernel():
    """Skips when the CPU kernel is not built, unless CI demanded it, where that is a failure."""
    if not extension.kernels_available("cpu"):
        if extension.require_fused_cpu():
            pytest.fail(f"fused CPU kernel required but not loaded: {extension.load_error('cpu')}")
        pytest.skip(f"fused CPU kernel not built: {extension.load_error('cpu')}")


class TinyDCNv3Block(torch.nn.Module):
    """A DCNv3 module as docs/model.md §3 writes it (no centre feature scale), built here so the op's tests
    do not depend on the model package; offsets and mask get random weights so sampling moves."""

    def __init__(self, channels: int = 16, groups: int = 2):
        super().__init__()
        self.groups = groups
        self.input_proj = torch.nn.Linear(channels, channels)
        self.dw_conv = torch.nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.norm = torch.nn.LayerNorm(channels, eps=1e-6)
        self.offset = torch.nn.Linear(channels, groups * 9 * 2)
        self.mask = torch.nn.Linear(channels, groups * 9)
        self.output_proj = torch.nn.Linear(channels, channels)

    def forward(self, x):
        from internimage.ops import dcnv3_core
        n, h, w, _ = x.shape
        branch = torch.nn.functional.gelu(self.norm(self.dw_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)))
        mask = self.mask(branch).reshape(n, h, w, self.groups, 9).softmax(-1).reshape(n, h, w, -1)
        out = dcnv3_core(self.input_proj(x), self.offset(branch) * 3, mask, groups=self.groups)
        return self.output_proj(out)


# The operator's parameter space, shared by the CPU and CUDA kernel tests.
PROBLEMS = {
    "default": Problem(),
    "stride2": Problem(height=9, width=8, stride=(2, 2)),
    "dilation2": Problem(height=9, width=10, dilation=(2, 2), pad=(2, 2)),
    "pad0": Problem(pad=(0, 0)),
    "pad2": Problem(pad=(2, 2)),
    "offset_scale2": Problem(offset_scale=2.0),
    "offset_scale_negative": Problem(offset_scale=-1.5),
    "remove_center": Problem(remove_center=True),
    "far_outside": Problem(offset_spread=25.0),
    "kernel5x3_mixed": Problem(kernel=(5, 3), stride=(2, 1), pad=(2, 0), dilation=(1, 2), width=11),
    "depth1": Problem(groups=3, depth=1),
    "depth3": Problem(groups=2, depth=3),
    "depth16": Problem(groups=4, depth=16, height=5, width=6),
    "depth30": Problem(groups=1, depth=30, height=5, width=5),
    "depth32": Problem(groups=2, depth=32, height=4, width=5),
    "depth64": Problem(groups=1, depth=64, height=4, width=4),
    "depth1024": Problem(batch=1, groups=2, depth=1024, height=3, width=3),
    "batch1": Problem(batch=1),
    "batch3": Problem(batch=3),
    "batch257": Problem(batch=257, height=3, width=4, groups=3, depth=8),
    "internimage_t_stage1": Problem(batch=2, height=56, width=56, groups=4, depth=16, offset_spread=1.0),
    # Offsets of ~4 px put many samples on the edges of the tiled CUDA kernels' shared-memory
    # windows (kernel reach + 3 px), where they switch between shared and global memory.
    "window_edges": Problem(batch=2, height=20, width=21, groups=2, depth=16, offset_spread=4.0),
    # Mask logits softmaxed inside the op (what DCNv3 always does to its mask), with 16 and 3
    # channels per group (vector and scalar paths) and one group's worth of lanes over a warp.
    "softmax_mask": Problem(groups=4, depth=16, height=6, width=7, softmax_mask=True),
    "softmax_mask_depth3": Problem(groups=3, depth=3, softmax_mask=True, remove_center=True),
}


# ---- non-finite inputs ---------------------------------------------------------------------------
# A diverged layer hands the op NaN or ±inf. The fused kernels must then give what the reference
# gives (NaN where it has NaN, ±inf where it has ±inf), so a diverged offset or mask shows up in the
# loss instead of vanishing. Each spot below poisons one element of one input; together they reach
# interior samples, border pixels, a sampling point far outside the image and one exactly on the
# loc = -1 border (which contributes nothing, yet its corner x = 0 lies inside the image).
NON_FINITE_PROBLEM = Problem(height=6, width=7, groups=2, depth=8, offset_spread=1.0)
NON_FINITE = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
NON_FINITE_SPOTS = {
    # (N, H, W, G·D): an interior pixel, the top-left pixel (group 1), the bottom-right pixel.
    "value": [(0, 3, 4, 1), (1, 0, 0, 10), (0, 5, 6, 15)],
    # (N, H_out, W_out, G·P·2): dx of an interior point, dy of a border pixel's point, both of one point.
    "offset": [(0, 2, 3, 8), (1, 0, 6, 23), (0, 4, 1, 32), (0, 4, 1, 33)],
    # (N, H_out, W_out, G·P): an interior point, a point moved far outside, a point at loc_x = -1.
    "mask": [(0, 2, 3, 13), (1, 0, 0, 0), (0, 3, 0, 1)],
}


def non_finite_inputs(poisoned: str, kind: str, dtype=torch.float64, device="cpu"):
    """(value, offset, mask) of NON_FINITE_PROBLEM with NON_FINITE[kind] at the spots of ``poisoned``
    ("value", "offset" or "mask"), and the upstream gradient, all of ``dtype``."""
    problem = NON_FINITE_PROBLEM
    value, offset, mask = problem.make(torch.float64, generator_seed=21, off_integer=True)
    offset[1, 0, 0, 0:2] = -3.0         # group 0, point 0 of pixel (0, 0): location (-4, -4), outside
    offset[0, 3, 0, 2:4] = torch.tensor([0.0, 0.25], dtype=offset.dtype)  # location x exactly -1
    inputs = {"value": value, "offset": offset, "mask": mask}
    for spot in NON_FINITE_SPOTS[poisoned]:
        inputs[poisoned][spot] = NON_FINITE[kind]
    gen = torch.Generator().manual_seed(22)
    grad_out = torch.randn(problem.batch, *problem.out_hw, problem.groups * problem.depth, generator=gen,
                           dtype=torch.float64)
    return (tuple(inputs[name].to(device=device, dtype=dtype) for name in ("value", "offset", "mask")),
            grad_out.to(device=device, dtype=dtype))


NON_FINITE_CASES = [(poisoned, kind) for poisoned in NON_FINITE_SPOTS for kind in NON_FINITE]


def assert_same_non_finite(got, want, label: str, rtol: float, atol: float) -> None:
    """NaN where ``want`` has NaN, the same ±inf where it has ±inf, finite entries within tolerance."""
    nan_got, nan_want = got.isnan(), want.isnan()
    assert torch.equal(nan_got, nan_want), (
        f"{label}: NaN at {nan_got.sum().item()} entries, reference at {nan_want.sum().item()}; first "
        f"differences at {(nan_got != nan_want).nonzero()[:4].tolist()}")
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{label}: {m}")
