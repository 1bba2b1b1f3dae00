"""The one dispatch point for the DCNv3 core: ``torch.library`` custom ops with autograd.

``internimage::dcnv3_core`` (value, offset_mask, geometry…) is a single node in traces, so fvcore's FLOP handle and
``torch.compile`` see one stable op; its backward is a second op,
``internimage::dcnv3_core_backward``, so compiled training graphs stay opaque to both kernels.
Each op runs the compiled kernel of the tensors' device (``extension.kernels_for``) and the
pure-PyTorch reference of ``reference.py`` where none is built.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import candidates, extension
from .reference import _pair, check_inputs, dcnv3_core_reference, sampling_points

OP_NAME = "internimage::dcnv3_core"
BACKWARD_OP_NAME = "internimage::dcnv3_core_backward"


def pack_offset_mask(offset: Tensor, mask: Tensor, groups: int, dim: int = -1) -> Tensor:
    """The op's ``offset_mask`` layout along ``dim``: for each group its P (dx, dy) pairs, then its
    P mask entries (G·P·3 in all). Packs activations (offset (…, G·P·2), mask (…, G·P), dim -1)
    and equally the offset and mask Linears' weights or biases (dim 0): a linear layer on packed
    weights outputs packed offsets and mask."""
    dim = dim % offset.dim()
    per_group = (offset.unflatten(dim, (groups, -1)), mask.unflatten(dim, (groups, -1)))
    return torch.cat(per_group, dim + 1).flatten(dim, dim + 1)


def split_offset_mask(offset_mask: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Inverse of ``pack_offset_mask`` on the last dimension: offset (…, G·P·2), mask (…, G·P)."""
    per_group = offset_mask.unflatten(-1, (groups, -1))
    points = per_group.shape[-1] // 3
    return per_group[..., :2 * points].flatten(-2), per_group[..., 2 * points:].flatten(-2)


def _reference_from_flat(value, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                         dilation_h, dilation_w, groups, offset_scale, remove_center, softmax_mask):
    return dcnv3_core_reference(value, *split_offset_mask(offset_mask, groups), (kernel_h, kernel_w),
                                (stride_h, stride_w), (pad_h, pad_w), (dilation_h, dilation_w),
                                groups=groups, offset_scale=offset_scale, remove_center=remove_center,
                                softmax_mask=softmax_mask)


@torch.library.custom_op(OP_NAME, mutates_args=())
def _dcnv3_core_op(value: Tensor, offset_mask: Tensor, kernel_h: int, kernel_w: int, stride_h: int,
                   stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, groups: int,
                   offset_scale: float, remove_center: bool, softmax_mask: bool) -> Tensor:
    params = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups,
              offset_scale, remove_center, softmax_mask)
    kernels = extension.kernels_for(value.device)
    if kernels is None:
        return _reference_from_flat(value, offset_mask, *params)
    return kernels.forward(value, offset_mask, *params, *_candidate("forward", value, offset_mask))


def _candidate(direction: str, value: Tensor, offset_mask: Tensor) -> tuple[str, ...]:
    """The CUDA kernel candidate for this call (ops/candidates.py) as the extension's last
    argument; the CPU extension has one kernel per direction and takes none."""
    if value.device.type != "cuda":
        return ()
    return (candidates.choose(direction, value.dtype, offset_mask.shape[1], offset_mask.shape[2]),)


@_dcnv3_core_op.register_fake
def _(value, offset_mask, *params):
    return value.new_empty((value.shape[0], offset_mask.shape[1], offset_mask.shape[2], value.shape[3]))


@torch.library.custom_op(BACKWARD_OP_NAME, mutates_args=())
def _dcnv3_core_backward_op(grad_output: Tensor, value: Tensor, offset_mask: Tensor, kernel_h: int,
                            kernel_w: int, stride_h: int, stride_w: int, pad_h: int, pad_w: int,
                            dilation_h: int, dilation_w: int, groups: int, offset_scale: float,
                            remove_center: bool, softmax_mask: bool) -> tuple[Tensor, Tensor]:
    kernels = extension.kernels_for(value.device)
    if kernels is None:
        raise RuntimeError(f"{BACKWARD_OP_NAME}: no compiled kernel for {value.device}; the autograd "
                           f"formula should have taken the reference path")
    grad_value, grad_offset_mask = kernels.backward(
        grad_output, value, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
        dilation_h, dilation_w, groups, offset_scale, remove_center, softmax_mask,
        *_candidate("backward", value, offset_mask))
    return grad_value, grad_offset_mask


@_dcnv3_core_backward_op.register_fake
def _(grad_output, value, offset_mask, *params):
    return torch.empty_like(value), torch.empty_like(offset_mask)


def _reference_backward(grad_output: Tensor, value: Tensor, offset_mask: Tensor, *params) -> tuple[Tensor, Tensor]:
    # Runs in autograd's backward (not inside an op), where the reference's own graph can be built.
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(True) for t in (value, offset_mask)]
        out = _reference_from_flat(*inputs, *params)
        return torch.autograd.grad(out, inputs, grad_output)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:2])
    ctx.params = inputs[2:]
    # Decided here, in the forward's thread: use_reference() is thread-local, and autograd may run
    # the backward on another thread.
    ctx.fused = extension.kernels_for(inputs[0].device) is not None


def _backward(ctx, grad_output):
    value, offset_mask = ctx.saved_tensors
    grad_output = grad_output.contiguous()
    if ctx.fused:
        grads = _dcnv3_core_backward_op(grad_output, value, offset_mask, *ctx.params)
    else:
        grads = _reference_backward(grad_output, value, offset_mask, *ctx.params)
    return (*grads,) + (None,) * len(ctx.params)


_dcnv3_core_op.register_autograd(_backward, setup_context=_setup_context)


def _autocast(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Under autocast every input runs in the autocast dtype (the kernels accumulate in fp32)."""
    device_type = tensors[0].device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


def dcnv3_core(value: Tensor, offset: Tensor, mask: Tensor, kernel_size=(3, 3), stride=(1, 1),
               pad=(1, 1), dilation=(1, 1), *, groups: int, offset_scale: float = 1.0,
               remove_center: bool = False, softmax_mask: bool = False) -> Tensor:
    """DCNv3 core (docs/model.md §4) through the registered op; same contract as ``dcnv3_core_reference``.

    Shapes: value (N, H_in, W_in, G·D), offset (N, H_out, W_out, G·P·2) holding (dx, dy) in input
    pixels per group and point, mask (N, H_out, W_out, G·P) → (N, H_out, W_out, G·D), in the
    inputs' dtype (the autocast dtype under autocast). Runs the fused kernel of the inputs' device
    (fp32 accumulation), else the reference. The op reads offsets and mask from one tensor, so
    they are packed here (a copy); ``dcnv3_core_packed`` takes them packed already.
    ``softmax_mask``: ``mask`` holds logits, softmaxed over each group's points inside the op (in
    registers, in fp32: no normalised mask is written or read; the backward includes the softmax's).
    """
    kernel_size, stride = _pair(kernel_size, "kernel_size"), _pair(stride, "stride")
    pad, dilation = _pair(pad, "pad"), _pair(dilation, "dilation")
    value, offset, mask = _autocast(value, offset, mask)
    check_inputs(value, offset, mask, kernel_size, stride, pad, dilation, groups, remove_center, offset_scale)
    return _run_op(value, pack_offset_mask(offset, mask, groups), kernel_size, stride, pad, dilation, groups,
                   offset_scale, remove_center, softmax_mask)


def dcnv3_core_packed(value: Tensor, offset_mask: Tensor, kernel_size=(3, 3), stride=(1, 1), pad=(1, 1),
                      dilation=(1, 1), *, groups: int, offset_scale: float = 1.0,
                      remove_center: bool = False, softmax_mask: bool = False) -> Tensor:
    """``dcnv3_core`` with offsets and mask in one tensor, as one linear layer on their packed
    weights produces them (model/dcnv3.py): read in place, its gradient comes back as one tensor.

    offset_mask: (N, H_out, W_out, G·P·3), per group its P (dx, dy) pairs then its P mask entries
    (``pack_offset_mask``). Equal to ``dcnv3_core(value, *split_offset_mask(offset_mask, groups), ...)``.
    """
    kernel_size, stride = _pair(kernel_size, "kernel_size"), _pair(stride, "stride")
    pad, dilation = _pair(pad, "pad"), _pair(dilation, "dilation")
    value, offset_mask = _autocast(value, offset_mask)
    points = len(sampling_points(kernel_size, remove_center))
    if offset_mask.dim() != 4 or offset_mask.shape[-1] != 3 * groups * points:
        raise ValueError(f"dcnv3_core_packed: offset_mask must be (N, H_out, W_out, groups·points·3) = "
                         f"(…, {3 * groups * points}) for groups={groups} and {points} points (per group "
                         f"its offsets, then its mask: pack_offset_mask), got shape {tuple(offset_mask.shape)}")
    # Views with the offset's and the mask's shapes: check_inputs reads shapes, dtypes and devices.
    check_inputs(value, offset_mask[..., :2 * groups * points], offset_mask[..., :groups * points], kernel_size,
                 stride, pad, dilation, groups, remove_center, offset_scale)
    return _run_op(value, offset_mask, kernel_size, stride, pad, dilation, groups, offset_scale,
                   remove_center, softmax_mask)


def _run_op(value, offset_mask, kernel_size, stride, pad, dilation, groups, offset_scale, remove_center,
            softmax_mask) -> Tensor:
    if not value.dtype.is_floating_point:
        raise TypeError(f"dcnv3_core: inputs must be floating point, got {value.dtype}")
    # Non-contiguous inputs are made contiguous: the kernels index dense channels-last tensors.
    return _dcnv3_core_op(value.contiguous(), offset_mask.contiguous(), *kernel_size, *stride, *pad,
                          *dilation, int(groups), float(offset_scale), bool(remove_center),
                          bool(softmax_mask))
