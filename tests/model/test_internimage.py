"""The seven variants match docs/model.md §1–2: parameters, official keys and shapes, forward contract."""
import pytest
import torch

from internimage.model import create_model, list_models

from tests.model.model_cases import ALL_VARIANTS, PARAMETERS, reduced_overrides, reference_shapes


def on_meta(name, **kwargs):
    with torch.device("meta"):
        return create_model(name, **kwargs)


def test_list_models_names_all_seven_variants():
    assert list_models() == ALL_VARIANTS


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_parameter_count_is_exactly_the_published_one(name):
    model = on_meta(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_state_dict_has_the_official_keys_and_shapes(name):
    ours = {key: tuple(value.shape) for key, value in on_meta(name).state_dict().items()}
    assert ours == reference_shapes(name)


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_reduced_copy_keeps_all_features_and_classifies(name):
    model = create_model(name, num_classes=7, **reduced_overrides(name)).eval()
    keys = model.state_dict().keys()
    full = on_meta(name).state_dict().keys()
    for feature in ("gamma1", "res_post_norm1", "post_norms", "center_feature_scale_proj_weight",
                    "clip_projector", "conv_head", "levels.0.norm."):
        assert any(feature in k for k in keys) == any(feature in k for k in full), feature
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["internimage_t", "internimage_h"])
def test_features_only_returns_nchw_maps_at_strides_4_to_32(name):
    model = create_model(name, features_only=True, **reduced_overrides(name)).eval()
    assert not any(k.startswith(("head", "conv_head", "clip_projector")) for k in model.state_dict())
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 64, 96))
    channels = model.arch.channels
    assert [tuple(m.shape) for m in maps] == [(1, channels * 2 ** i, 16 // 2 ** i, 24 // 2 ** i) for i in range(4)]
    assert [info["reduction"] for info in model.feature_info] == [4, 8, 16, 32]

    picked = create_model(name, features_only=True, out_indices=(1, 3), **reduced_overrides(name)).eval()
    with torch.no_grad():
        assert [m.shape[1] for m in picked(torch.randn(1, 3, 64, 64))] == [channels * 2, channels * 8]


@pytest.mark.parametrize("name", ["internimage_t", "internimage_h"])
def test_forward_equals_forward_head_of_forward_features(name):
    model = create_model(name, num_classes=5, **reduced_overrides(name)).eval()
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(image), pre_logits=True)
        assert pooled.shape == (2, model.num_features)
        torch.testing.assert_close(model(image), model.head(pooled))


def test_reset_classifier_changes_only_the_final_linear():
    model = create_model("internimage_t", num_classes=10, **reduced_overrides("internimage_t"))
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    model.reset_classifier(3)
    assert model.head.out_features == 3 and model.num_classes == 3
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, model.num_features)


@pytest.mark.parametrize("name", ["internimage_t", "internimage_s", "internimage_h"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, drop_path_rate=0.3, **reduced_overrides(name)).train()
    image = torch.randn(2, 3, 64, 64)

    def gradients():
        torch.manual_seed(1)  # same drop-path draws in both runs
        model.zero_grad()
        model(image).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.set_grad_checkpointing(True)
    assert all(all(level.checkpointed) for level in model.levels)
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)


def test_grad_checkpointing_per_stage_and_every_kth_block():
    model = create_model("internimage_t", depths=(2, 2, 4, 2))
    model.set_grad_checkpointing([False, True, True, False], every=2)
    assert [level.checkpointed for level in model.levels] == [
        [False, False], [True, False], [True, False, True, False], [False, False]]
    with pytest.raises(ValueError, match="one flag per stage"):
        model.set_grad_checkpointing([True, False])


def test_drop_path_rises_linearly_over_all_blocks():
    model = create_model("internimage_t", drop_path_rate=0.3, depths=(1, 1, 2, 1))
    rates = [block.drop_path.drop_prob for level in model.levels for block in level.blocks]
    assert rates == pytest.approx([0.0, 0.075, 0.15, 0.225, 0.3])


def test_dcnv3_offsets_and_mask_start_at_zero_so_sampling_starts_on_the_regular_grid():
    block = create_model("internimage_t", depths=(1, 1, 1, 1)).levels[0].blocks[0]
    for linear in (block.dcn.offset, block.dcn.mask):
        assert not linear.weight.any() and not linear.bias.any()


def test_unknown_model_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="internimage_t, internimage_s"):
        create_model("internimage_z")


def test_channels_not_divisible_by_groups_is_rejected_naming_the_values():
    with pytest.raises(ValueError, match=r"stage 0 has 64 channels.*groups=5"):
        create_model("internimage_t", groups=(5, 8, 16, 32))


def test_unknown_architecture_override_is_rejected():
    with pytest.raises(ValueError, match="unknown architecture override.*'depth'"):
        create_model("internimage_t", depth=(1, 1, 1, 1))
