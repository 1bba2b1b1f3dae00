"""The public op's contract around the kernels: clear errors for bad input, layout freedom,
autocast, determinism, one node under torch.compile, and model-level agreement with the reference."""
import pytest
import torch

from internimage import ops

from tests.ops.ops_cases import Problem, TinyDCNv3Block, require_cpu_kernel


def _inputs(problem=Problem(), dtype=torch.float32):
    return problem.make(dtype, generator_seed=1)


@pytest.mark.parametrize("which, shape, message", [
    ("value", (2, 7, 9), "value must be 4-D"),
    ("offset", (2, 7, 9, 18), r"offset must have shape \(2, 7, 9, 36\)"),
    ("mask", (2, 7, 9, 9), r"mask must have shape \(2, 7, 9, 18\)"),
    ("offset", (2, 7, 9, 36, 1), "offset must be 4-D"),
])
def test_bad_shapes_name_the_problem(which, shape, message):
    value, offset, mask = _inputs()
    tensors = dict(value=value, offset=offset, mask=mask)
    tensors[which] = torch.randn(shape)
    with pytest.raises(ValueError, match=message):
        ops.dcnv3_core(tensors["value"], tensors["offset"], tensors["mask"], groups=2)


def test_channels_not_divisible_by_groups():
    value, offset, mask = _inputs()
    with pytest.raises(ValueError, match="not divisible by groups=3"):
        ops.dcnv3_core(value, offset, mask, groups=3)


@pytest.mark.parametrize("offset_scale", [float("nan"), float("inf")])
def test_non_finite_offset_scale_is_refused(offset_scale):
    value, offset, mask = _inputs()
    with pytest.raises(ValueError, match="offset_scale must be a finite number"):
        ops.dcnv3_core(value, offset, mask, groups=2, offset_scale=offset_scale)


def test_mixed_dtypes_are_an_error_outside_autocast():
    value, offset, mask = _inputs()
    with pytest.raises(TypeError, match="share a dtype"):
        ops.dcnv3_core(value.double(), offset, mask, groups=2)


def test_integer_inputs_are_an_error():
    value, offset, mask = _inputs()
    with pytest.raises(TypeError, match="floating point"):
        ops.dcnv3_core(value.long(), offset.long(), mask.long(), groups=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_tensors_on_different_devices_are_an_error():
    value, offset, mask = _inputs()
    with pytest.raises(ValueError, match="one device"):
        ops.dcnv3_core(value.cuda(), offset, mask, groups=2)


def test_meta_device_mismatch_is_an_error():
    value, offset, mask = _inputs()
    with pytest.raises(ValueError, match="one device"):
        ops.dcnv3_core(value.to("meta"), offset, mask, groups=2)


def test_extension_rechecks_shapes_when_called_directly():
    require_cpu_kernel()
    from internimage.ops import _cpu
    value, _, _ = _inputs()
    too_narrow = torch.randn(2, 7, 9, 50)  # groups=2, 9 points: 54 wide
    with pytest.raises(RuntimeError, match=r"offset_mask must have shape \(2, 7, 9, 54\)"):
        _cpu.forward(value, too_narrow, 3, 3, 1, 1, 1, 1, 1, 1, 2, 1.0, False, False)


def test_packed_offset_mask_is_a_group_by_group_interleave():
    # Per group: its P (dx, dy) pairs, then its P mask entries (the layout the kernels index).
    offset = torch.arange(2 * 9 * 2).view(1, 1, 1, 36).float()
    mask = 100 + torch.arange(2 * 9).view(1, 1, 1, 18).float()
    packed = ops.pack_offset_mask(offset, mask, groups=2)
    assert packed[0, 0, 0].tolist() == (list(range(18)) + list(range(100, 109)) + list(range(18, 36))
                                        + list(range(109, 118)))
    restored = ops.split_offset_mask(packed, groups=2)
    assert torch.equal(restored[0], offset) and torch.equal(restored[1], mask)


def test_a_linear_on_packed_weights_outputs_packed_offsets_and_mask():
    torch.manual_seed(0)
    offset_linear, mask_linear, x = torch.nn.Linear(8, 36), torch.nn.Linear(8, 18), torch.randn(2, 3, 4, 8)
    packed = torch.nn.functional.linear(x, ops.pack_offset_mask(offset_linear.weight, mask_linear.weight, 2, dim=0),
                                        ops.pack_offset_mask(offset_linear.bias, mask_linear.bias, 2, dim=0))
    torch.testing.assert_close(packed, ops.pack_offset_mask(offset_linear(x), mask_linear(x), 2))


@pytest.mark.parametrize("softmax_mask", [False, True])
def test_packed_entry_point_equals_the_separate_one_with_gradients(softmax_mask):
    problem = Problem(softmax_mask=softmax_mask)
    value, offset, mask = _inputs(problem, torch.float64)
    separate = [t.clone().requires_grad_(True) for t in (value, offset, mask)]
    want = ops.dcnv3_core(*separate, **problem.kwargs())
    want.square().sum().backward()
    packed_value = value.clone().requires_grad_(True)
    packed = ops.pack_offset_mask(offset, mask, problem.groups).requires_grad_(True)
    got = ops.dcnv3_core_packed(packed_value, packed, **problem.kwargs())
    got.square().sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(packed_value.grad, separate[0].grad, rtol=0, atol=0)
    torch.testing.assert_close(packed.grad, ops.pack_offset_mask(separate[1].grad, separate[2].grad, problem.groups),
                               rtol=0, atol=0)


def test_packed_entry_point_names_its_layout_on_a_bad_width():
    value, offset, mask = _inputs()
    with pytest.raises(ValueError, match=r"offset_mask must be .*\(…, 54\) for groups=2 and 9 points"):
        ops.dcnv3_core_packed(value, torch.cat([offset, mask, mask], -1), groups=2)


def test_non_contiguous_inputs_simply_work():
    problem = Problem()
    value, offset, mask = _inputs(problem)
    # Same values, other memory layouts: a permuted copy permuted back, and a sliced wider tensor.
    value_nc = value.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    offset_nc = torch.cat([offset, offset], dim=-1)[..., :offset.shape[-1]]
    mask_nc = mask.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (value_nc.is_contiguous() or offset_nc.is_contiguous() or mask_nc.is_contiguous())
    torch.testing.assert_close(ops.dcnv3_core(value_nc, offset_nc, mask_nc, **problem.kwargs()),
                               ops.dcnv3_core(value, offset, mask, **problem.kwargs()))


def test_autocast_runs_in_bf16_and_casts_mixed_inputs():
    problem = Problem(groups=2, depth=8)
    value, offset, mask = _inputs(problem)
    leaves = [value.requires_grad_(), offset.double().requires_grad_(), mask.requires_grad_()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.dcnv3_core(*leaves, **problem.kwargs())
    assert out.dtype == torch.bfloat16
    exact = ops.dcnv3_core_reference(value.double(), offset.double(), mask.double(), **problem.kwargs())
    assert ((out.double() - exact).norm() / exact.norm()) < 1e-2
    out.float().sum().backward()
    assert [t.grad.dtype for t in leaves] == [torch.float32, torch.float64, torch.float32]


def test_op_is_registered_under_its_stable_name():
    assert ops.OP_NAME == "internimage::dcnv3_core"
    assert torch.ops.internimage.dcnv3_core.default is not None
    assert torch.ops.internimage.dcnv3_core_backward.default is not None


def test_use_reference_switches_implementation_for_the_forward_and_its_backward(monkeypatch):
    require_cpu_kernel()
    calls = []
    import internimage.ops.dcnv3 as dispatch
    original = dispatch._reference_from_flat
    monkeypatch.setattr(dispatch, "_reference_from_flat", lambda *a: calls.append(1) or original(*a))
    value, offset, mask = [t.requires_grad_() for t in _inputs()]
    with ops.use_reference():
        out = ops.dcnv3_core(value, offset, mask, groups=2)
    out.sum().backward()  # outside the block: the backward still follows the forward's choice
    assert len(calls) == 2
    calls.clear()
    ops.dcnv3_core(value, offset, mask, groups=2).sum().backward()
    assert calls == []


def test_torch_compile_fullgraph_traces_a_dcnv3_block_with_its_backward():
    require_cpu_kernel()
    torch.manual_seed(0)
    block = TinyDCNv3Block()
    x = torch.randn(2, 6, 7, 16, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in block.parameters()] + [x.grad.clone()]
    block.zero_grad()
    x.grad = None
    with ops.use_reference():
        expected = block(x)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, [p.grad for p in block.parameters()] + [x.grad]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_whole_internimage_t_same_logits_and_gradients_fused_vs_reference():
    require_cpu_kernel()
    try:
        from internimage.model import create_model
    except ImportError as error:
        pytest.skip(f"model package not importable: {error}")
    torch.manual_seed(0)
    model = create_model("internimage_t", num_classes=10, depths=(1, 1, 2, 1), drop_path_rate=0.0)
    for module in model.modules():  # move sampling off the regular grid so offsets matter
        if hasattr(module, "offset") and isinstance(module.offset, torch.nn.Linear):
            torch.nn.init.normal_(module.offset.weight, std=0.5)
    model.eval()  # BatchNorm in the head: same statistics for both runs
    images = torch.randn(2, 3, 64, 64)

    def run():
        model.zero_grad()
        logits = model(images)
        logits.logsumexp(-1).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fused_logits, fused_grads = run()
    with ops.use_reference():
        ref_logits, ref_grads = run()
    torch.testing.assert_close(fused_logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert fused_grads.keys() == ref_grads.keys()
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], ref_grads[name], rtol=1e-3, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
