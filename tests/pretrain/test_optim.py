"""Schedule and parameter groups: warm-up + cosine per step; LLRD/DCN scales; no decay on 1-D."""

import pytest
import torch

from internimage.model import create_model, param_lr_scales
from internimage.pretrain.engine import param_groups
from internimage.pretrain.module import PretrainModule
from internimage.pretrain.optim import cosine_lr, set_lr


def test_warmup_rises_linearly_then_cosine_falls_to_min_lr():
    def lr(step):
        return cosine_lr(step, total_steps=110, warmup_steps=10, base_lr=1.0, min_lr=0.1, warmup_lr=0.0)

    assert lr(0) == 0.0 and lr(5) == pytest.approx(0.5) and lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    values = [lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def _module():
    torch.manual_seed(0)
    image = create_model("internimage_t", num_classes=10, channels=8, depths=(1, 1, 2, 1), groups=(1, 1, 2, 2))
    return PretrainModule(image, "supervised")


def test_groups_carry_the_models_lr_scales_and_exempt_1d_and_biases_from_decay():
    module = _module()
    groups = param_groups(module, weight_decay=0.05, layer_decay=0.7, dcn_lr_mult=0.1)
    expected = param_lr_scales(module.image, 0.7, 0.1)
    seen = set()
    for group in groups:
        for name, param in zip(group["names"], group["params"]):
            seen.add(name)
            assert group["lr_scale"] == pytest.approx(expected[name[len("image."):]])
            exempt = param.ndim <= 1 or name.endswith(".bias")
            assert group["weight_decay"] == (0.0 if exempt else 0.05), name
    assert seen == {n for n, _ in module.named_parameters()}
    offset = [g for g in groups if any(n.endswith("dcn.offset.weight") for n in g["names"])]
    assert offset and all(g["lr_scale"] < 0.1 + 1e-9 for g in offset)
    assert max(g["lr_scale"] for g in groups) == 1.0
    assert min(g["lr_scale"] for g in groups) == pytest.approx(0.7 ** 4 * 0.1)  # offsets of block 0


def test_set_lr_scales_each_group():
    module = _module()
    optimizer = torch.optim.AdamW(param_groups(module, 0.05, 0.5, 1.0))
    set_lr(optimizer, 2.0)
    assert {round(g["lr"] / g["lr_scale"], 9) for g in optimizer.param_groups} == {2.0}
    assert len({g["lr"] for g in optimizer.param_groups}) > 2
