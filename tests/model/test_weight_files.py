"""Weight files as users have them: .pth and .safetensors load alike; pretrained=True (timm's habit
with a hub) is an error that says what to pass instead."""
import pytest
import torch

from internimage.model import create_model

SMALL = dict(depths=(1, 1, 1, 1), channels=16, groups=(1, 2, 4, 8))


def test_a_safetensors_file_loads_like_a_pth(tmp_path):
    from safetensors.torch import save_file
    source = create_model("internimage_t", num_classes=10, **SMALL)
    weights = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(weights, str(tmp_path / "w.safetensors"))
    torch.save({"model": weights}, tmp_path / "w.pth")
    from_safetensors = create_model("internimage_t", num_classes=10, pretrained=tmp_path / "w.safetensors", **SMALL)
    from_pth = create_model("internimage_t", num_classes=10, pretrained=str(tmp_path / "w.pth"), **SMALL)
    for key, value in weights.items():
        assert torch.equal(from_safetensors.state_dict()[key], value)
        assert torch.equal(from_pth.state_dict()[key], value)


def test_pretrained_true_names_what_to_pass():
    with pytest.raises(ValueError, match="no model hub here; pass the path of an official-format checkpoint"):
        create_model("internimage_t", pretrained=True)


def test_pretrained_false_is_a_random_initialisation():
    assert create_model("internimage_t", num_classes=3, pretrained=False, **SMALL).head.weight.shape == (3, 192)
