"""Schedule and parameter groups: warm-up + cosine per step; LLRD/DCN scales; no decay on 1-D."""

import os

import pytest
import torch

from internimage.model import create_model, param_lr_scales
from internimage.pretrain.engine import param_groups
from internimage.pretrain.module import PretrainModule
from internimage.pretrain.optim import cosine_lr, set_lr
from tests.paths import REPO


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


def test_the_h_recipe_resumed_on_half_the_ranks_keeps_its_length_and_lr_curve():
    """Issue #13's example: H at 256 ranks × 32 (8,192 images a step), resumed on 128 ranks at step 100k.
    Counted in steps, the new run would be 366,210 steps long and its LR 4.2e-4; counted in samples it
    keeps the 183,090-step length of 8,192 and the LR the linear scaling rule gives half the batch."""
    from internimage.pretrain.config import load_config
    from internimage.pretrain.engine import scaled_lr
    from internimage.pretrain.optim import Schedule
    cfg = load_config(os.path.join(REPO, "configs", "pretrain_internimage_h_laion_22k.yaml"), [])
    schedule = Schedule.from_config(cfg.schedule, cfg.data.epoch_samples, schedule_batch=32 * 256)
    assert schedule.total_samples == 183_090 * 8192 and schedule.warmup_samples == 3_052 * 8192
    samples = 100_000 * 8192
    assert 100_000 + schedule.steps_left(samples, global_batch=32 * 128) == 100_000 + 2 * 83_090

    def lr(world):
        return schedule.lr(samples, scaled_lr(cfg, world), cfg.optim.min_lr, cfg.optim.warmup_lr)
    assert lr(256) == pytest.approx(4.40e-4, abs=5e-7)
    assert lr(128) == pytest.approx(2.20e-4, abs=5e-7)  # half the peak, same point of the curve
