"""The fused CPU kernel computes docs/model.md §4 exactly as the reference does: forward and all three
gradients, in fp64 to 1e-10 and in fp32 to float rounding, over the operator's whole parameter
space."""
import zlib

import pytest
import torch

from internimage import ops

from tests.ops.ops_cases import (NON_FINITE_CASES, NON_FINITE_PROBLEM, PROBLEMS, Problem,
                                 assert_same_non_finite, non_finite_inputs, require_cpu_kernel)



def _forward_and_grads(fn, problem, inputs, grad_out):
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves, **problem.kwargs())
    return (out, *torch.autograd.grad(out, leaves, grad_out))


@pytest.mark.parametrize("name", PROBLEMS)
def test_fused_matches_reference_in_fp64(name):
    require_cpu_kernel()
    problem = PROBLEMS[name]
    inputs = problem.make(torch.float64, generator_seed=zlib.crc32(name.encode()))
    grad_out = torch.randn(problem.batch, *problem.out_hw, problem.groups * problem.depth,
                           dtype=torch.float64)
    fused = _forward_and_grads(ops.dcnv3_core, problem, inputs, grad_out)
    reference = _forward_and_grads(ops.dcnv3_core_reference, problem, inputs, grad_out)
    for label, a, b in zip(("output", "grad value", "grad offset", "grad mask"), fused, reference):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=lambda m: f"{name} {label}: {m}")


@pytest.mark.parametrize("name", ["default", "stride2", "remove_center", "far_outside", "depth30"])
def test_fused_matches_reference_in_fp32(name):
    require_cpu_kernel()
    problem = PROBLEMS[name]
    inputs = problem.make(torch.float32, generator_seed=7)
    grad_out = torch.randn(problem.batch, *problem.out_hw, problem.groups * problem.depth)
    fused = _forward_and_grads(ops.dcnv3_core, problem, inputs, grad_out)
    exact = _forward_and_grads(ops.dcnv3_core_reference, problem, [t.double() for t in inputs],
                               grad_out.double())
    for label, a, b in zip(("output", "grad value", "grad offset", "grad mask"), fused, exact):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{label}: {m}")


def test_bf16_accumulates_in_fp32():
    require_cpu_kernel()
    problem = Problem(groups=2, depth=32, height=6, width=6)
    inputs = problem.make(torch.bfloat16, generator_seed=3, off_integer=True)
    grad_out = torch.randn(problem.batch, *problem.out_hw, 64).bfloat16()
    fused = _forward_and_grads(ops.dcnv3_core, problem, inputs, grad_out)
    exact = _forward_and_grads(ops.dcnv3_core_reference, problem, [t.double() for t in inputs],
                               grad_out.double())
    for label, a, b in zip(("output", "grad value", "grad offset", "grad mask"), fused, exact):
        assert a.dtype == torch.bfloat16
        rel = (a.double() - b).norm() / b.norm()
        assert rel < 1e-2, f"{label}: relative error {rel:.2e}"


@pytest.mark.parametrize("softmax_mask", [False, True], ids=["mask", "mask_logits"])
def test_gradcheck_fp64(softmax_mask):
    require_cpu_kernel()
    problem = Problem(batch=1, height=4, width=5, groups=2, depth=3, offset_scale=1.5, stride=(2, 1),
                      softmax_mask=softmax_mask)
    value, offset, mask = problem.make(torch.float64, generator_seed=11)
    # Keep sampling points off integer coordinates, where bilinear interpolation has kinks.
    offset = offset + 0.37
    inputs = [t.requires_grad_(True) for t in (value, offset, mask)]
    assert torch.autograd.gradcheck(lambda v, o, m: ops.dcnv3_core(v, o, m, **problem.kwargs()), inputs)


def test_backward_is_deterministic():
    require_cpu_kernel()
    problem = Problem(batch=3, groups=2, depth=8, offset_spread=0.7)
    inputs = problem.make(torch.float32, generator_seed=5)
    grad_out = torch.randn(problem.batch, *problem.out_hw, 16)
    first = _forward_and_grads(ops.dcnv3_core, problem, inputs, grad_out)
    torch.use_deterministic_algorithms(True)
    try:
        second = _forward_and_grads(ops.dcnv3_core, problem, inputs, grad_out)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["default", "stride2", "dilation2", "offset_scale2", "remove_center"])
def test_fused_matches_reference_on_the_regular_grid_where_every_dcnv3_starts(name):
    """Zero offsets put every sample on an integer location (a kink of bilinear sampling), and the
    border points exactly at loc = -1: both sides take the right derivative and drop those points."""
    require_cpu_kernel()
    problem = PROBLEMS[name]
    value, offset, mask = problem.make(torch.float64, generator_seed=3)
    grad_out = torch.randn(problem.batch, *problem.out_hw, problem.groups * problem.depth, dtype=torch.float64)
    fused = _forward_and_grads(ops.dcnv3_core, problem, (value, torch.zeros_like(offset), mask), grad_out)
    reference = _forward_and_grads(ops.dcnv3_core_reference, problem, (value, torch.zeros_like(offset), mask),
                                   grad_out)
    for label, a, b in zip(("output", "grad value", "grad offset", "grad mask"), fused, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=lambda m: f"{name} {label}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", [2, 4, 8])
def test_locations_just_below_a_power_of_two_border_stay_inside_the_image(side, dtype):
    """dx = -2^-22 puts the right/bottom points at loc = side − ulp. Flooring by truncating loc + 1
    rounded that up to a corner one pixel past the image: out-of-bounds reads, and writes that
    corrupted the heap in the backward (NaN losses in bf16 training of the 32 px demo)."""
    require_cpu_kernel()
    gen = torch.Generator().manual_seed(side)
    value = torch.randn(2, side, side, 16, generator=gen)
    offset = torch.full((2, side, side, 18), -2.0 ** -22)
    mask = torch.rand(2, side, side, 9, generator=gen)
    leaves = [t.to(dtype).requires_grad_(True) for t in (value, offset, mask)]
    out = ops.dcnv3_core(*leaves, groups=1)
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    expected = ops.dcnv3_core_reference(*(t.detach().double() for t in leaves), groups=1)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=tolerance)
    assert all(torch.isfinite(g).all() for g in grads)


def test_reference_in_bfloat16_computes_locations_in_float32():
    """The fallback path under bf16 training: locations near 64 px must not round to 0.25 px."""
    gen = torch.Generator().manual_seed(11)
    value = torch.randn(1, 64, 64, 8, generator=gen).bfloat16()
    offset = (torch.randn(1, 64, 64, 18, generator=gen) * 0.3).bfloat16()
    mask = torch.rand(1, 64, 64, 9, generator=gen).bfloat16()
    got = ops.dcnv3_core_reference(value, offset, mask, groups=1)
    want = ops.dcnv3_core_reference(value.double(), offset.double(), mask.double(), groups=1)
    assert got.dtype == torch.bfloat16
    assert (got.double() - want).abs().max() < 0.05


@pytest.mark.parametrize("poisoned, kind", NON_FINITE_CASES)
def test_non_finite_inputs_give_what_the_reference_gives(poisoned, kind):
    """NaN/±inf in value, offset or mask: forward and all three gradients carry NaN and ±inf where
    the reference does (a NaN offset makes its sample NaN instead of contributing 0), and the
    finite entries still agree."""
    require_cpu_kernel()
    inputs, grad_out = non_finite_inputs(poisoned, kind)
    fused = _forward_and_grads(ops.dcnv3_core, NON_FINITE_PROBLEM, inputs, grad_out)
    reference = _forward_and_grads(ops.dcnv3_core_reference, NON_FINITE_PROBLEM, inputs, grad_out)
    for label, a, b in zip(("output", "grad value", "grad offset", "grad mask"), fused, reference):
        assert_same_non_finite(a, b, f"{poisoned}={kind} {label}", rtol=0, atol=1e-10)


@pytest.mark.parametrize("op", ["fused", "reference"])
def test_softmax_mask_is_the_op_on_the_softmaxed_mask(op):
    """softmax_mask=True equals softmaxing each group's P mask logits first and passing the
    weights: forward and all three gradients (the mask's through the softmax), fp64 to 1e-10."""
    if op == "fused":
        require_cpu_kernel()
    fn = ops.dcnv3_core if op == "fused" else ops.dcnv3_core_reference
    problem = PROBLEMS["softmax_mask"]
    value, offset, logits = problem.make(torch.float64, generator_seed=13)
    grad_out = torch.randn(problem.batch, *problem.out_hw, problem.groups * problem.depth, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (value, offset, logits)]
    n, h, w, _ = logits.shape
    weights = leaves[2].reshape(n, h, w, problem.groups, problem.points).softmax(-1).reshape(n, h, w, -1)
    unfused = ops.dcnv3_core_reference(leaves[0], leaves[1], weights,
                                       **{**problem.kwargs(), "softmax_mask": False})
    want = (unfused, *torch.autograd.grad(unfused, leaves, grad_out))
    got = _forward_and_grads(fn, problem, (value, offset, logits), grad_out)
    for label, a, b in zip(("output", "grad value", "grad offset", "grad mask logits"), got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=lambda m: f"{label}: {m}")
