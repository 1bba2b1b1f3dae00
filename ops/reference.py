"""DCNv3 core operator in plain PyTorch: the test oracle and the fallback (docs/model.md §4).

Every fused kernel is checked against this file, so it favours obviousness over speed: sampling
locations are built exactly as docs/model.md §4 writes them and the four bilinear corners are gathered with
plain indexing. (``F.grid_sample`` would be faster, but its normalised coordinates round integer
locations, such as the regular grid every DCNv3 starts on, to either side of the pixel, so its
offset gradient there flips between the left and the right derivative.)
"""
from __future__ import annotations

import math

from typing import Sequence

import torch
from torch import Tensor


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"dcnv3_core: {name} must be an int or a pair (h, w), got {value!r}")
    return pair


def sampling_points(kernel_size: Sequence[int], remove_center: bool) -> list[tuple[int, int]]:
    """Kernel points (i, j) in operator order: i is the width index (outer), j the height index."""
    kh, kw = kernel_size
    if remove_center and (kh != kw or kh % 2 == 0):
        raise ValueError(f"dcnv3_core: remove_center needs a square odd kernel, got {kh}x{kw}")
    points = [(i, j) for i in range(kw) for j in range(kh)]
    if remove_center:
        points.remove((kw // 2, kh // 2))
    return points


def output_size(in_size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    """docs/model.md §4: H_out = (H_in + 2·pad − (dil·(k−1) + 1)) / stride + 1."""
    return (in_size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def check_inputs(value: Tensor, offset: Tensor, mask: Tensor, kernel_size, stride, pad, dilation,
                 groups: int, remove_center: bool, offset_scale: float) -> tuple[int, int, int]:
    """Validates shapes, dtypes, devices and offset_scale; returns (H_out, W_out, points per group)."""
    if not math.isfinite(offset_scale):
        raise ValueError(f"dcnv3_core: offset_scale must be a finite number, got {offset_scale}")
    for name, tensor in (("value", value), ("offset", offset), ("mask", mask)):
        if tensor.dim() != 4:
            raise ValueError(f"dcnv3_core: {name} must be 4-D channels-last (N, H, W, C), "
                             f"got shape {tuple(tensor.shape)}")
    if not (value.device == offset.device == mask.device):
        raise ValueError(f"dcnv3_core: value, offset and mask must be on one device, got "
                         f"{value.device}, {offset.device}, {mask.device}")
    if not (value.dtype == offset.dtype == mask.dtype):
        raise TypeError(f"dcnv3_core: value, offset and mask must share a dtype, got {value.dtype}, "
                        f"{offset.dtype}, {mask.dtype}; cast them (or run under autocast)")
    n, h_in, w_in, channels = value.shape
    if groups < 1 or channels % groups:
        raise ValueError(f"dcnv3_core: value has {channels} channels, not divisible by groups={groups}")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, pad, dilation
    if min(sh, sw, dh, dw, kh, kw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"dcnv3_core: kernel, stride and dilation must be >= 1 and pad >= 0, got "
                         f"kernel={kernel_size}, stride={stride}, pad={pad}, dilation={dilation}")
    h_out, w_out = output_size(h_in, kh, sh, ph, dh), output_size(w_in, kw, sw, pw, dw)
    if h_out < 1 or w_out < 1:
        raise ValueError(f"dcnv3_core: input {h_in}x{w_in} is too small for kernel={kernel_size}, "
                         f"pad={pad}, dilation={dilation}")
    points = len(sampling_points(kernel_size, remove_center))
    expected = {"offset": (n, h_out, w_out, groups * points * 2), "mask": (n, h_out, w_out, groups * points)}
    for name, tensor in (("offset", offset), ("mask", mask)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"dcnv3_core: {name} must have shape {expected[name]} (N, H_out, W_out, "
                             f"groups·points{'·2' if name == 'offset' else ''}) for groups={groups} "
                             f"and {points} points, got {tuple(tensor.shape)}")
    return h_out, w_out, points


def dcnv3_core_reference(value: Tensor, offset: Tensor, mask: Tensor, kernel_size=(3, 3), stride=(1, 1),
                         pad=(1, 1), dilation=(1, 1), *, groups: int, offset_scale: float = 1.0,
                         remove_center: bool = False, softmax_mask: bool = False) -> Tensor:
    """Deformable sampling of ``value`` at kernel points moved by ``offset``, weighted by ``mask``.

    Args:
        value: (N, H_in, W_in, G·D) features to sample.
        offset: (N, H_out, W_out, G·P·2) per group and point the pair (dx, dy), x (width) first, in
            pixels before ``offset_scale``.
        mask: (N, H_out, W_out, G·P) point weights (already normalised by the caller), or with
            ``softmax_mask`` their logits: the weights are then the softmax over each group's P
            points (what DCNv3 always does to its mask), computed here in at least fp32.
    Returns:
        (N, H_out, W_out, G·D), the dtype of ``value`` (computed in at least fp32).
    """
    kernel_size, stride = _pair(kernel_size, "kernel_size"), _pair(stride, "stride")
    pad, dilation = _pair(pad, "pad"), _pair(dilation, "dilation")
    h_out, w_out, num_points = check_inputs(value, offset, mask, kernel_size, stride, pad, dilation,
                                            groups, remove_center, offset_scale)
    n, h_in, w_in, channels = value.shape
    depth = channels // groups
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, pad, dilation
    centre_w, centre_h = dw * (kw - 1) // 2, dh * (kh - 1) // 2
    # Half-precision locations would be off by up to 0.25 px at 64 px: compute in fp32 at least,
    # as the kernels do, and hand back the input dtype.
    out_dtype = value.dtype
    compute_dtype = torch.promote_types(value.dtype, torch.float32)
    value, offset, mask = (t.to(compute_dtype) for t in (value, offset, mask))
    if softmax_mask:
        mask = mask.reshape(n, h_out, w_out, groups, num_points).softmax(-1).reshape(mask.shape)

    points = sampling_points(kernel_size, remove_center)
    grid_x = torch.tensor([i * dw - centre_w for i, _ in points], dtype=value.dtype, device=value.device)
    grid_y = torch.tensor([j * dh - centre_h for _, j in points], dtype=value.dtype, device=value.device)
    base_x = torch.arange(w_out, dtype=value.dtype, device=value.device) * sw - pw + centre_w
    base_y = torch.arange(h_out, dtype=value.dtype, device=value.device) * sh - ph + centre_h

    offset = offset.reshape(n, h_out, w_out, groups, num_points, 2)
    loc_x = base_x.view(1, 1, w_out, 1, 1) + (grid_x + offset[..., 0]) * offset_scale
    loc_y = base_y.view(1, h_out, 1, 1, 1) + (grid_y + offset[..., 1]) * offset_scale

    # A point at loc <= -1 or >= size contributes nothing (docs/model.md §4). Its weight is mask · inside
    # (not a select), so a non-finite mask there still turns the output into NaN, as does a
    # non-finite location (NaN bilinear weights times the zero corner values): a diverged offset or
    # mask must not hide behind a finite loss. The fused kernels reproduce this arithmetic.
    inside = (loc_x > -1) & (loc_x < w_in) & (loc_y > -1) & (loc_y < h_in)
    point_weight = mask.reshape(n, h_out, w_out, groups, num_points) * inside

    def per_group(t: Tensor) -> Tensor:  # (N, H_out, W_out, G, P) → (N·G, H_out·W_out·P)
        return t.permute(0, 3, 1, 2, 4).reshape(n * groups, -1)

    planes = value.reshape(n, h_in, w_in, groups, depth).permute(0, 3, 1, 2, 4)
    corner_weights, corner_values = bilinear_corners(planes.reshape(n * groups, h_in, w_in, depth),
                                                     per_group(loc_x), per_group(loc_y), per_group(inside))
    # The mask scales each corner weight before the corner values (m·w)·v, the kernels' order, so
    # infinite masks and values meet the same products in both.
    corner_weights = corner_weights * per_group(point_weight).unsqueeze(-1)
    out = torch.einsum("blc,blcd->bld", corner_weights, corner_values)
    out = out.view(n, groups, h_out, w_out, num_points, depth).sum(-2)
    return out.permute(0, 2, 3, 1, 4).reshape(n, h_out, w_out, channels).to(out_dtype)


def bilinear_corners(planes: Tensor, loc_x: Tensor, loc_y: Tensor, contributes: Tensor) -> tuple[Tensor, Tensor]:
    """The four bilinear corners of channels-last ``planes`` (B, H, W, D) at pixel coordinates
    (B, L): their weights (B, L, 4) and values (B, L, 4, D), corners in the order (y0, x0),
    (y0, x0+1), (y0+1, x0), (y0+1, x0+1).

    Pixel k has its centre at k. A corner outside the plane, or of a location that does not
    contribute (``contributes`` False, (B, L)), reads exactly 0: selected, not multiplied by 0, so a
    non-finite pixel never leaks into samples that do not touch it, and no gradient reaches the
    clamped index such a corner was gathered from (for a non-finite location that index comes
    from an undefined float-to-integer conversion). The weights carry the gradient with respect to
    the locations (the right derivative at integer locations, like floor); a non-finite location
    has NaN weights.
    """
    batch, height, width, depth = planes.shape
    x0, y0 = torch.floor(loc_x), torch.floor(loc_y)
    frac_x, frac_y = loc_x - x0, loc_y - y0
    weights = torch.stack(((1 - frac_x) * (1 - frac_y), frac_x * (1 - frac_y),
                           (1 - frac_x) * frac_y, frac_x * frac_y), dim=-1)  # (B, L, 4)
    # Indices only where they are meaningful: elsewhere any in-range index will do, it is masked.
    x0 = torch.where(contributes, x0, 0).long()
    y0 = torch.where(contributes, y0, 0).long()
    corners_x = x0.unsqueeze(-1) + torch.tensor([0, 1, 0, 1], device=planes.device)
    corners_y = y0.unsqueeze(-1) + torch.tensor([0, 0, 1, 1], device=planes.device)
    readable = (contributes.unsqueeze(-1) & (corners_x >= 0) & (corners_x < width) & (corners_y >= 0)
                & (corners_y < height))
    index = corners_y.clamp(0, height - 1) * width + corners_x.clamp(0, width - 1)
    rows = torch.arange(batch, device=planes.device).view(batch, 1, 1)
    corners = planes.reshape(batch, height * width, depth)[rows, index]  # (B, L, 4, D)
    return weights, torch.where(readable.unsqueeze(-1), corners, torch.zeros((), dtype=corners.dtype,
                                                                             device=corners.device))

