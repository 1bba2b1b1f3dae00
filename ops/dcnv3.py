"""The one dispatch point for the DCNv3 core: a ``torch.library`` custom op with autograd.

``internimage::dcnv3_core`` is a single node in traces, so fvcore's FLOP handle and
``torch.compile`` see one stable op. Its implementation is chosen per device; until a fused kernel
is registered for a device, the pure-PyTorch formulation of ``reference.py`` runs there.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .reference import _pair, check_inputs, dcnv3_core_reference

OP_NAME = "internimage::dcnv3_core"


def _reference_from_flat(value, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                         dilation_h, dilation_w, groups, offset_scale, remove_center):
    return dcnv3_core_reference(value, offset, mask, (kernel_h, kernel_w), (stride_h, stride_w),
                                (pad_h, pad_w), (dilation_h, dilation_w), groups=groups,
                                offset_scale=offset_scale, remove_center=remove_center)


@torch.library.custom_op(OP_NAME, mutates_args=())
def _dcnv3_core_op(value: Tensor, offset: Tensor, mask: Tensor, kernel_h: int, kernel_w: int,
                   stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int,
                   dilation_w: int, groups: int, offset_scale: float, remove_center: bool) -> Tensor:
    return _reference_from_flat(value, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h,
                                pad_w, dilation_h, dilation_w, groups, offset_scale, remove_center)


def _reference_backward(grad_output: Tensor, value: Tensor, offset: Tensor, mask: Tensor,
                        *params) -> tuple[Tensor, Tensor, Tensor]:
    # Runs in autograd's backward (not inside an op), where the reference's own graph can be built.
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(True) for t in (value, offset, mask)]
        out = _reference_from_flat(*inputs, *params)
        return torch.autograd.grad(out, inputs, grad_output)


@_dcnv3_core_op.register_fake
def _(value, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
      dilation_w, groups, offset_scale, remove_center):
    return value.new_empty((value.shape[0], offset.shape[1], offset.shape[2], value.shape[3]))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])
    ctx.params = inputs[3:]


def _backward(ctx, grad_output):
    value, offset, mask = ctx.saved_tensors
    grads = _reference_backward(grad_output.contiguous(), value, offset, mask, *ctx.params)
    return (*grads,) + (None,) * len(ctx.params)


_dcnv3_core_op.register_autograd(_backward, setup_context=_setup_context)


def dcnv3_core(value: Tensor, offset: Tensor, mask: Tensor, kernel_size=(3, 3), stride=(1, 1),
               pad=(1, 1), dilation=(1, 1), *, groups: int, offset_scale: float = 1.0,
               remove_center: bool = False) -> Tensor:
    """DCNv3 core (SPEC §4) through the registered op; same contract as ``dcnv3_core_reference``.

    Shapes: value (N, H_in, W_in, G·D), offset (N, H_out, W_out, G·P·2), mask (N, H_out, W_out, G·P)
    → (N, H_out, W_out, G·D). Non-contiguous inputs are made contiguous.
    """
    kernel_size, stride = _pair(kernel_size, "kernel_size"), _pair(stride, "stride")
    pad, dilation = _pair(pad, "pad"), _pair(dilation, "dilation")
    check_inputs(value, offset, mask, kernel_size, stride, pad, dilation, groups, remove_center)
    return _dcnv3_core_op(value.contiguous(), offset.contiguous(), mask.contiguous(), *kernel_size,
                          *stride, *pad, *dilation, int(groups), float(offset_scale), bool(remove_center))
