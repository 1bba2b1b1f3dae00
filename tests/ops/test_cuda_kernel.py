"""The CUDA kernels against the reference (fp64 on the CPU): fp32 to float rounding, fp16/bf16 to
half-precision tolerances, forward and all three gradients, every output buffer poisoned first.
Skipped cleanly without a GPU; INTERNIMAGE_REQUIRE_FUSED_CUDA=1 makes a missing CUDA kernel fail."""
import os
import zlib

import pytest
import torch

from internimage import ops
from internimage.ops import extension

from tests.ops.ops_cases import (NON_FINITE_CASES, NON_FINITE_PROBLEM, PROBLEMS, Problem,
                                 assert_same_non_finite, non_finite_inputs)

pytestmark = pytest.mark.gpu



@pytest.fixture(autouse=True)
def cuda_kernel_loaded():
    if not extension.kernels_available("cuda"):
        if os.environ.get("INTERNIMAGE_REQUIRE_FUSED_CUDA", "") not in ("", "0"):
            pytest.fail(f"fused CUDA kernel required but not loaded: {extension.load_error('cuda')}")
        pytest.skip(f"fused CUDA kernel not built: {extension.load_error('cuda')}")


def _poison_allocator(*like: torch.Tensor):
    """Fills freshly freed blocks of the caching allocator with NaN, so outputs the op allocates
    next (same sizes) start as NaN and any element the kernels fail to write shows up."""
    blocks = [torch.full(t.shape, float("nan"), dtype=t.dtype, device="cuda") for t in like]
    blocks += [torch.full(t.shape, float("nan"), dtype=torch.float32, device="cuda") for t in like[:1]]
    del blocks


def _run(problem, inputs, grad_out):
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    _poison_allocator(grad_out)
    out = ops.dcnv3_core(*leaves, **problem.kwargs())
    _poison_allocator(*inputs)
    grads = torch.autograd.grad(out, leaves, grad_out)
    torch.cuda.synchronize()
    return (out, *grads)


def _exact(problem, inputs, grad_out):
    leaves = [t.detach().cpu().double().requires_grad_(True) for t in inputs]
    out = ops.dcnv3_core_reference(*leaves, **problem.kwargs())
    return (out, *torch.autograd.grad(out, leaves, grad_out.cpu().double()))


def _grad_out(problem, dtype):
    return torch.randn(problem.batch, *problem.out_hw, problem.groups * problem.depth, device="cuda",
                       dtype=dtype)


@pytest.mark.parametrize("name", PROBLEMS)
def test_fp32_matches_reference(scheme, name):
    problem = PROBLEMS[name]
    torch.manual_seed(zlib.crc32(name.encode()))
    inputs = problem.make(torch.float32, device="cuda", generator_seed=zlib.crc32(name.encode()))
    grad_out = _grad_out(problem, torch.float32)
    got, want = _run(problem, inputs, grad_out), _exact(problem, inputs, grad_out)
    for label, a, b in zip(("output", "grad value", "grad offset", "grad mask"), got, want):
        assert a.dtype == torch.float32 and a.is_cuda
        assert not a.isnan().any(), f"{name} {label}: unwritten (NaN) elements"
        torch.testing.assert_close(a.cpu().double(), b, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{name} {label}: {m}")


@pytest.mark.parametrize("name", ["default", "depth16", "depth30", "depth32", "depth64", "batch257",
                                  "internimage_t_stage1", "softmax_mask"])
def test_fp64_matches_reference_tightly(scheme, name):
    problem = PROBLEMS[name]
    inputs = problem.make(torch.float64, device="cuda", generator_seed=5)
    grad_out = _grad_out(problem, torch.float64)
    got, want = _run(problem, inputs, grad_out), _exact(problem, inputs, grad_out)
    for label, a, b in zip(("output", "grad value", "grad offset", "grad mask"), got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-10, msg=lambda m: f"{name} {label}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["default", "depth3", "depth16", "depth32", "depth1024", "remove_center",
                                  "internimage_t_stage1", "softmax_mask"])
def test_half_precision_within_tolerance(scheme, name, dtype):
    problem = PROBLEMS[name]
    inputs = problem.make(dtype, device="cuda", generator_seed=9, off_integer=True)
    grad_out = _grad_out(problem, dtype)
    got, want = _run(problem, inputs, grad_out), _exact(problem, inputs, grad_out)
    for label, a, b in zip(("output", "grad value", "grad offset", "grad mask"), got, want):
        assert a.dtype == dtype
        assert not a.isnan().any(), f"{name} {label}: unwritten (NaN) elements"
        rel = (a.cpu().double() - b).norm() / b.norm()
        assert rel < 1e-2, f"{name} {label}: relative error {rel:.2e}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("poisoned, kind", NON_FINITE_CASES)
def test_non_finite_inputs_give_what_the_reference_gives(scheme, poisoned, kind, dtype):
    """NaN/±inf in value, offset or mask: NaN and ±inf wherever the reference has them (a NaN
    offset makes its sample NaN instead of contributing 0), finite entries within tolerance."""
    inputs, grad_out = non_finite_inputs(poisoned, kind, dtype, device="cuda")
    got, want = _run(NON_FINITE_PROBLEM, inputs, grad_out), _exact(NON_FINITE_PROBLEM, inputs, grad_out)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    for label, a, b in zip(("output", "grad value", "grad offset", "grad mask"), got, want):
        assert_same_non_finite(a.cpu(), b, f"{poisoned}={kind} {label}", rtol=tolerance, atol=tolerance)


def test_autocast_bf16_on_cuda():
    problem = Problem(groups=4, depth=16)
    value, offset, mask = problem.make(torch.float32, device="cuda", generator_seed=2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = ops.dcnv3_core(value, offset, mask.double(), **problem.kwargs())
    assert out.dtype == torch.bfloat16


def test_deterministic_mode_refuses_the_atomic_backward():
    problem = Problem()
    leaves = [t.requires_grad_() for t in problem.make(torch.float32, device="cuda")]
    out = ops.dcnv3_core(*leaves, **problem.kwargs())
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="dcnv3_core_backward"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)


def test_unaligned_views_still_work():
    problem = Problem(groups=2, depth=8)
    inputs = problem.make(torch.bfloat16, device="cuda", generator_seed=4, off_integer=True)

    def shifted(t):  # a storage offset of one element breaks every vector's alignment
        view = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")[1:].view(t.shape)
        return view.copy_(t)

    torch.testing.assert_close(ops.dcnv3_core(*[shifted(t) for t in inputs], **problem.kwargs()),
                               ops.dcnv3_core(*inputs, **problem.kwargs()))
