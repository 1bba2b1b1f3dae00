"""Official checkpoints load (docs/model.md §5): wrappers, prefixes, strict backbone keys, head policies."""
import logging

import pytest
import torch

from internimage.model import create_model, extract_state_dict, load_pretrained

from tests.model.model_cases import ALL_VARIANTS, reduced_overrides, reduced_reference_shapes


def official_checkpoint(name: str, num_classes: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under exactly the official keys and shapes of a reduced-depth copy."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in reduced_reference_shapes(name).items():
        if key.startswith("head."):
            shape = (num_classes,) + shape[1:]
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator)
    return state


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_round_trip_official_to_ours_to_official_is_exact(name, tmp_path):
    official = official_checkpoint(name)
    path = tmp_path / "official.pth"
    torch.save({"model": official, "epoch": 3}, path)
    model = create_model(name, pretrained=path, **reduced_overrides(name))
    exported = model.state_dict()
    assert exported.keys() == official.keys()
    for key, value in official.items():
        assert torch.equal(exported[key], value), key


def test_student_prefix_and_module_wrapper_are_unwrapped(tmp_path):
    official = official_checkpoint("internimage_h")
    wrapped = {"module": {**{f"student.{k}": v for k, v in official.items()},
                          **{f"teacher.{k}": torch.zeros_like(v) for k, v in official.items()}}}
    assert extract_state_dict(wrapped).keys() == official.keys()
    path = tmp_path / "h_distill.pth"
    torch.save(wrapped, path)
    model = create_model("internimage_h", pretrained=path, **reduced_overrides("internimage_h"))
    key = "levels.2.blocks.0.dcn.center_feature_scale_proj_weight"
    assert torch.equal(model.state_dict()[key], official[key])


def test_ddp_module_prefix_is_stripped():
    official = official_checkpoint("internimage_t")
    assert extract_state_dict({"state_dict": {f"module.{k}": v for k, v in official.items()}}).keys() == official.keys()


def test_21841_class_head_is_remapped_to_1000_by_class_indices():
    official = official_checkpoint("internimage_t", num_classes=21841)
    indices = torch.randperm(21841, generator=torch.Generator().manual_seed(0))[:1000].tolist()
    model = create_model("internimage_t", num_classes=1000, **reduced_overrides("internimage_t"))
    load_pretrained(model, {"model": official}, class_indices=indices)
    assert torch.equal(model.head.weight, official["head.weight"][indices])
    assert torch.equal(model.head.bias, official["head.bias"][indices])


def test_head_of_another_size_is_replaced_with_a_warning(caplog):
    official = official_checkpoint("internimage_h", num_classes=21841)
    model = create_model("internimage_h", num_classes=10, **reduced_overrides("internimage_h"))
    fresh_head = model.head.weight.clone()
    with caplog.at_level(logging.WARNING):
        load_pretrained(model, {"model": official})
    assert "does not fit the model's 10 classes" in caplog.text
    assert torch.equal(model.head.weight, fresh_head)
    key = "clip_projector.cross_dcn.q.weight"
    assert torch.equal(model.state_dict()[key], official[key])  # the rest of the head still loads


def test_class_indices_out_of_range_is_an_error():
    official = official_checkpoint("internimage_t", num_classes=100)
    model = create_model("internimage_t", num_classes=2, **reduced_overrides("internimage_t"))
    with pytest.raises(ValueError, match="class_indices must lie in 0..99"):
        load_pretrained(model, {"model": official}, class_indices=[0, 100])


def test_missing_and_unexpected_backbone_keys_are_named():
    official = official_checkpoint("internimage_t")
    del official["levels.1.blocks.0.dcn.offset.weight"]
    official["levels.1.blocks.0.dcn.extra.weight"] = torch.zeros(1)
    model = create_model("internimage_t", **reduced_overrides("internimage_t"))
    with pytest.raises(ValueError) as error:
        load_pretrained(model, {"model": official})
    assert "missing keys: levels.1.blocks.0.dcn.offset.weight" in str(error.value)
    assert "unexpected keys: levels.1.blocks.0.dcn.extra.weight" in str(error.value)


def test_a_checkpoint_of_another_variant_fails_naming_the_shapes():
    official = official_checkpoint("internimage_s")
    model = create_model("internimage_b", **reduced_overrides("internimage_b"))
    mismatch = r"patch_embed.conv1.weight: checkpoint \(40, 3, 3, 3\) vs model \(56, 3, 3, 3\)"
    with pytest.raises(ValueError, match=mismatch):
        load_pretrained(model, {"model": official})


def test_features_only_backbone_loads_a_classification_checkpoint():
    official = official_checkpoint("internimage_t")
    model = create_model("internimage_t", features_only=True, **reduced_overrides("internimage_t"))
    load_pretrained(model, {"model": official})
    assert torch.equal(model.patch_embed.conv1.weight, official["patch_embed.conv1.weight"])


def test_create_model_with_pretrained_and_new_class_count_gets_a_real_fresh_head(tmp_path):
    path = tmp_path / "t.pth"
    torch.save({"model": official_checkpoint("internimage_t")}, path)
    model = create_model("internimage_t", num_classes=10, pretrained=path, **reduced_overrides("internimage_t"))
    assert not any(t.is_meta for t in model.state_dict().values())
    assert model.head.weight.shape == (10, 768) and model.head.weight.std() < 0.05
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(1, 3, 64, 64))).all()


def test_half_precision_checkpoint_loads_as_float32(tmp_path):
    official = {k: v.half() if v.is_floating_point() else v for k, v in official_checkpoint("internimage_t").items()}
    path = tmp_path / "t_fp16.pth"
    torch.save({"model": official}, path)
    model = create_model("internimage_t", pretrained=path, **reduced_overrides("internimage_t"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
