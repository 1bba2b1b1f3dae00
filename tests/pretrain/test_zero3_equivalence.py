"""Under ZeRO-3 on 2 real processes, the engine's pieces equal their plain single-model meaning.

One deepspeed launch runs every check (tests/pretrain/ds_checks.py); each test reads its numbers.
"""
import json
import os

import pytest

from tests.pretrain.pretrain_helpers import deepspeed_cmd, run, tail

pytestmark = pytest.mark.multiprocess  # every test here starts a real 2-rank process group


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds_checks")
    result = run(deepspeed_cmd(2, "--module", "tests.pretrain.ds_checks", str(out)))
    assert result.returncode == 0, tail(result)
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    return ranks[0]


def test_per_group_learning_rates_take_effect_under_zero3(checks):
    # Eight distinct LR scales (layer decay 0.5 over 4 blocks, DCN multiplier 0.1) are present and
    # every parameter moved by exactly its scale relative to the single-LR run.
    assert checks["llrd_distinct_scales"] >= 5
    assert checks["llrd_ratio_error"] < 1e-3


def test_per_group_learning_rates_take_effect_with_the_optimizer_offloaded(checks):
    # deepspeed.offload_optimizer=cpu: DeepSpeed's CPU Adam over the same groups.
    assert checks["offload_llrd_distinct_scales"] >= 5
    assert checks["offload_llrd_ratio_error"] < 1e-3


def test_activation_checkpointing_leaves_zero3_gradients_unchanged(checks):
    assert checks["ckpt_grad_total"] > 1.0
    assert checks["ckpt_grads"] < 1e-6


def test_the_gradient_guard_reads_the_same_partitions_as_deepspeeds_accessor(checks):
    for name in ("local_grads", "offload_local_grads"):
        assert checks[f"{name}_total"] > 1.0
        assert checks[name] == 0.0


def test_sharded_ema_equals_full_model_ema(checks):
    assert checks["ema"] < 1e-6


def test_evaluating_with_ema_swapped_in_equals_a_plain_model_with_ema_weights(checks):
    assert checks["ema_swap"] < 1e-5
    assert checks["ema_live_differs"] > 1e-3  # the live weights are not the EMA: the swap mattered


def test_clip_loss_with_gathered_features_equals_the_joint_batch_loss(checks):
    assert checks["clip_gather"] < 1e-5
    assert checks["clip_gather_grad"] < 1e-6
