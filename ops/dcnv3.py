"""The one dispatch point for the DCNv3 core: ``torch.library`` custom ops with autograd.

``internimage::dcnv3_core`` is a single node in traces, so fvcore's FLOP handle and
``torch.compile`` see one stable op; its backward is a second op,
``internimage::dcnv3_core_backward``, so compiled training graphs stay opaque to both kernels.
Each op runs the compiled kernel of the tensors' device (``extension.kernels_for``) and the
pure-PyTorch reference of ``reference.py`` where none is built.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import candidates, extension
from .reference import _pair, check_inputs, dcnv3_core_reference

OP_NAME = "internimage::dcnv3_core"
BACKWARD_OP_NAME = "internimage::dcnv3_core_backward"


def _reference_from_flat(value, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                         dilation_h, dilation_w, groups, offset_scale, remove_center, softmax_mask):
    return dcnv3_core_reference(value, offset, mask, (kernel_h, kernel_w), (stride_h, stride_w),
                                (pad_h, pad_w), (dilation_h, dilation_w), groups=groups,
                                offset_scale=offset_scale, remove_center=remove_center,
                                softmax_mask=softmax_mask)


@torch.library.custom_op(OP_NAME, mutates_args=())
def _dcnv3_core_op(value: Tensor, offset: Tensor, mask: Tensor, kernel_h: int, kernel_w: int,
                   stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int,
                   dilation_w: int, groups: int, offset_scale: float, remove_center: bool,
                   softmax_mask: bool) -> Tensor:
    params = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups,
              offset_scale, remove_center, softmax_mask)
    kernels = extension.kernels_for(value.device)
    if kernels is None:
        return _reference_from_flat(value, offset, mask, *params)
    return kernels.forward(value, offset, mask, *params, *_candidate("forward", value, offset))


def _candidate(direction: str, value: Tensor, offset: Tensor) -> tuple[str, ...]:
    """The CUDA kernel candidate for this call (ops/candidates.py) as the extension's last
    argument; the CPU extension has one kernel per direction and takes none."""
    if value.device.type != "cuda":
        return ()
    return (candidates.choose(direction, value.dtype, offset.shape[1], offset.shape[2]),)


@_dcnv3_core_op.register_fake
def _(value, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
      dilation_w, groups, offset_scale, remove_center, softmax_mask):
    return value.new_empty((value.shape[0], offset.shape[1], offset.shape[2], value.shape[3]))


@torch.library.custom_op(BACKWARD_OP_NAME, mutates_args=())
def _dcnv3_core_backward_op(grad_output: Tensor, value: Tensor, offset: Tensor, mask: Tensor,
                            kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, pad_h: int,
                            pad_w: int, dilation_h: int, dilation_w: int, groups: int,
                            offset_scale: float, remove_center: bool,
                            softmax_mask: bool) -> tuple[Tensor, Tensor, Tensor]:
    kernels = extension.kernels_for(value.device)
    if kernels is None:
        raise RuntimeError(f"{BACKWARD_OP_NAME}: no compiled kernel for {value.device}; the autograd "
                           f"formula should have taken the reference path")
    grad_value, grad_offset, grad_mask = kernels.backward(
        grad_output, value, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
        dilation_h, dilation_w, groups, offset_scale, remove_center, softmax_mask,
        *_candidate("backward", value, offset))
    return grad_value, grad_offset, grad_mask


@_dcnv3_core_backward_op.register_fake
def _(grad_output, value, offset, mask, *params):
    return torch.empty_like(value), torch.empty_like(offset), torch.empty_like(mask)


def _reference_backward(grad_output: Tensor, value: Tensor, offset: Tensor, mask: Tensor,
                        *params) -> tuple[Tensor, Tensor, Tensor]:
    # Runs in autograd's backward (not inside an op), where the reference's own graph can be built.
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(True) for t in (value, offset, mask)]
        out = _reference_from_flat(*inputs, *params)
        return torch.autograd.grad(out, inputs, grad_output)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])
    ctx.params = inputs[3:]
    # Decided here, in the forward's thread: use_reference() is thread-local, and autograd may run
    # the backward on another thread.
    ctx.fused = extension.kernels_for(inputs[0].device) is not None


def _backward(ctx, grad_output):
    value, offset, mask = ctx.saved_tensors
    grad_output = grad_output.contiguous()
    if ctx.fused:
        grads = _dcnv3_core_backward_op(grad_output, value, offset, mask, *ctx.params)
    else:
        grads = _reference_backward(grad_output, value, offset, mask, *ctx.params)
    return (*grads,) + (None,) * len(ctx.params)


_dcnv3_core_op.register_autograd(_backward, setup_context=_setup_context)


def _autocast(value: Tensor, offset: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Under autocast all three inputs run in the autocast dtype (the kernels accumulate in fp32)."""
    device_type = value.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return value, offset, mask
    dtype = torch.get_autocast_dtype(device_type)
    return value.to(dtype), offset.to(dtype), mask.to(dtype)


def dcnv3_core(value: Tensor, offset: Tensor, mask: Tensor, kernel_size=(3, 3), stride=(1, 1),
               pad=(1, 1), dilation=(1, 1), *, groups: int, offset_scale: float = 1.0,
               remove_center: bool = False, softmax_mask: bool = False) -> Tensor:
    """DCNv3 core (docs/model.md §4) through the registered op; same contract as ``dcnv3_core_reference``.

    Shapes: value (N, H_in, W_in, G·D), offset (N, H_out, W_out, G·P·2) holding (dx, dy) in input
    pixels per group and point, mask (N, H_out, W_out, G·P) → (N, H_out, W_out, G·D), in the
    inputs' dtype (the autocast dtype under autocast). Runs the fused kernel of the inputs' device
    (fp32 accumulation), else the reference. Non-contiguous inputs are made contiguous.
    ``softmax_mask``: ``mask`` holds logits, softmaxed over each group's points inside the op (in
    registers, in fp32: no normalised mask is written or read; the backward includes the softmax's).
    """
    kernel_size, stride = _pair(kernel_size, "kernel_size"), _pair(stride, "stride")
    pad, dilation = _pair(pad, "pad"), _pair(dilation, "dilation")
    value, offset, mask = _autocast(value, offset, mask)
    check_inputs(value, offset, mask, kernel_size, stride, pad, dilation, groups, remove_center, offset_scale)
    if not value.dtype.is_floating_point:
        raise TypeError(f"dcnv3_core: inputs must be floating point, got {value.dtype}")
    return _dcnv3_core_op(value.contiguous(), offset.contiguous(), mask.contiguous(), *kernel_size,
                          *stride, *pad, *dilation, int(groups), float(offset_scale), bool(remove_center),
                          bool(softmax_mask))
