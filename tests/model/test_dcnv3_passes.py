"""How many passes one DCNv3 module makes (forward + backward), counted at the ATen dispatch level on CPU.

Offsets and mask logits reach the op in the layout it reads (from one GEMM on packed weights, or with
few pixels two GEMMs and a pack), the op softmaxes the mask logits itself, and the (H, G)
centre-feature-scale gate is blended per group without repeating it over the channels. These tests
pin the copies, layout changes and GEMMs, so a change that adds one shows up here.
"""
from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from internimage.model import DCNv3, create_model, param_lr_scales
from internimage.ops import dcnv3_core, kernels_available

N, H, W, C, G = 2, 6, 7, 32, 4

COPIES = {"clone", "copy_", "_to_copy", "cat", "stack", "index_select", "repeat", "repeat_interleave",
          "contiguous", "constant_pad_nd"}
LAYOUT = {"permute", "transpose", "t"}
GEMMS = {"mm", "addmm", "bmm", "baddbmm"}


class PassCounter(TorchDispatchMode):
    """Counts ATen calls by overload packet; copies are split into activation copies (results of 4 or
    more dimensions: (N, H, W, ·) and its per-group view (N, H, W, G, ·)) and parameter copies (the
    packed weights and biases, at most 3-D)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in COPIES and isinstance(out, torch.Tensor):
            name = f"{name}[{'activation' if out.dim() >= 4 else 'parameter'}]"
        self.calls[name] += 1
        return out

    def total(self, names: set[str], kind: str | None = None) -> int:
        return sum(n for call, n in self.calls.items()
                   if call.split("[")[0] in names and (kind is None or call.endswith(f"[{kind}]")))


def count_passes(center_feature_scale: bool, pixels: tuple[int, int, int]) -> PassCounter:
    torch.manual_seed(0)
    module = DCNv3(C, G, center_feature_scale=center_feature_scale)
    x = torch.randn(*pixels, C, requires_grad=True)  # inside a network the input needs its gradient
    module(x).sum().backward()  # warm-up outside the counter (lazy initialisation)
    module.zero_grad(set_to_none=True)  # first accumulation steals the gradient: no add_ counted
    x.grad = None
    with PassCounter() as counter:
        module(x).square().sum().backward()
    return counter


fused_kernel = pytest.mark.skipif(not kernels_available("cpu"),
                                  reason="the reference backward runs plain ATen ops: counts differ")


# The op reads offsets and mask logits packed, (N, H, W, G·P·3). With at least C pixels they come
# from one GEMM on the packed offset/mask weights: no activation is copied, split or joined, for 6
# copies of parameter size (packing the weight and the bias in the forward; gathering each Linear's
# weight and bias gradient out of the packed one in the backward). With fewer pixels than C (late
# stages at small images) the two Linears run and their outputs are packed instead: 3 activation
# copies (the pack, and splitting its gradient for the two weight gradients), each smaller there
# than the weights.
ONE_GEMM, TWO_GEMMS = (N, H, W), (1, 4, 5)  # 84 and 20 pixels, C = 32
PINNED = {  # (pixels, center_feature_scale) → counts
    (ONE_GEMM, False): {"activation copies": 0, "parameter copies": 6, "permute/transpose": 19, "mm/addmm": 9},
    (ONE_GEMM, True): {"activation copies": 0, "parameter copies": 6, "permute/transpose": 24, "mm/addmm": 12},
    (TWO_GEMMS, False): {"activation copies": 3, "parameter copies": 0, "permute/transpose": 24, "mm/addmm": 12},
    (TWO_GEMMS, True): {"activation copies": 3, "parameter copies": 0, "permute/transpose": 29, "mm/addmm": 15},
}


@fused_kernel
@pytest.mark.parametrize("pixels", [ONE_GEMM, TWO_GEMMS], ids=["one GEMM", "two GEMMs"])
@pytest.mark.parametrize("center_feature_scale", [False, True])
def test_one_dcnv3_forward_backward_makes_the_pinned_number_of_passes(center_feature_scale, pixels):
    counter = count_passes(center_feature_scale, pixels)
    got = {"activation copies": counter.total(COPIES, "activation"),
           "parameter copies": counter.total(COPIES, "parameter"),
           "permute/transpose": counter.total(LAYOUT), "mm/addmm": counter.total(GEMMS)}
    # GEMMs: input_proj, offset+mask (or offset and mask), (gate,) output_proj: one addmm each in the
    # forward and two mm each (input and weight gradient) in the backward. permute/transpose: 4
    # permutes (to and from NCHW around the depthwise conv, forward and backward; it reads the
    # channels-last input through a permuted view, no layout copy) and 5 weight transposes (t) per GEMM.
    assert got == PINNED[(pixels, center_feature_scale)], dict(sorted(counter.calls.items()))


def two_linear_forward(module: DCNv3, x: torch.Tensor) -> torch.Tensor:
    """The module as docs/model.md §3 writes it: the gate repeated over each group's channels."""
    projected = module.input_proj(x)
    branch = module.dw_conv(x.permute(0, 3, 1, 2))
    out = dcnv3_core(projected, module.offset(branch), module.mask(branch), groups=module.groups,
                     offset_scale=module.offset_scale, softmax_mask=True)
    if module.center_feature_scale:
        gate = torch.sigmoid(F.linear(branch, module.center_feature_scale_proj_weight,
                                      module.center_feature_scale_proj_bias))
        gate = gate.repeat_interleave(module.channels // module.groups, dim=-1)
        out = out * (1 - gate) + projected * gate
    return module.output_proj(out)


def outputs_and_gradients(module: DCNv3, x: torch.Tensor, forward) -> tuple[torch.Tensor, dict]:
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out = forward(x)
    out.square().sum().backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    grads["input"] = x.grad
    return out.detach(), grads


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("center_feature_scale", [False, True])
@pytest.mark.parametrize("pixels", [ONE_GEMM, TWO_GEMMS], ids=["one GEMM", "two GEMMs"])
def test_the_module_equals_its_definition(center_feature_scale, dtype, tol, pixels):
    # fp64: equal up to summation order; fp32: 2e-5 relative (outputs and gradients are O(1), the
    # per-group lerp and the repeated gate round differently).
    torch.manual_seed(0)
    module = DCNv3(C, G, offset_scale=1.5, center_feature_scale=center_feature_scale).to(dtype)
    with torch.no_grad():  # offset, mask and gate start at zero: move them so every branch matters
        for p in module.parameters():
            p.normal_(std=0.3)
    x = torch.randn(*pixels, C, dtype=dtype)
    got, got_grads = outputs_and_gradients(module, x, module)
    want, want_grads = outputs_and_gradients(module, x, lambda t: two_linear_forward(module, t))
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=tol, atol=tol, msg=name)


def test_parameters_keep_their_names_and_the_dcn_lr_multiplier_finds_the_offsets():
    model = create_model("internimage_h", depths=(1, 1, 1, 1), level2_post_norm_block_ids=(), channels=40,
                         groups=(1, 2, 4, 8))
    names = [n for n in dict(model.named_parameters()) if n.startswith("levels.0.blocks.0.dcn.")]
    assert sorted(n.split(".dcn.")[1] for n in names) == sorted([
        "center_feature_scale_proj_weight", "center_feature_scale_proj_bias", "dw_conv.0.weight",
        "dw_conv.0.bias", "dw_conv.1.1.weight", "dw_conv.1.1.bias", "offset.weight", "offset.bias",
        "mask.weight", "mask.bias", "input_proj.weight", "input_proj.bias", "output_proj.weight",
        "output_proj.bias"])
    scales = param_lr_scales(model, dcn_lr_mult=0.1)
    multiplied = {n.split(".dcn.")[1] for n in names if scales[n] == pytest.approx(0.1)}
    assert multiplied == {"offset.weight", "offset.bias", "center_feature_scale_proj_weight",
                          "center_feature_scale_proj_bias"}
