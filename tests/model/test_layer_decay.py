"""Layer ids for layer-wise LR decay and the DCN LR multiplier, as docs/model.md §2 defines them."""
import pytest
import torch

from internimage.model import blocks_after, create_model, no_weight_decay, param_lr_scales

T_DEPTHS = (4, 4, 18, 4)  # 30 blocks: the last block has k = 0, the first k = 29


@pytest.mark.parametrize("name, k", [
    ("patch_embed.conv1.weight", 29),              # stem = block 0 of stage 0
    ("levels.0.blocks.0.mlp.fc1.weight", 29),
    ("levels.0.blocks.3.norm1.0.weight", 26),
    ("levels.0.downsample.conv.weight", 25),       # downsample of stage 0 = block 0 of stage 1
    ("levels.0.norm.0.weight", 25),
    ("levels.2.blocks.17.dcn.offset.weight", 4),
    ("levels.2.norm.0.bias", 3),                   # = block 0 of stage 3
    ("levels.3.blocks.3.mlp.fc2.bias", 0),
    ("levels.3.norm.0.weight", 0),                 # the stage-3 norm keeps ratio 1
    ("levels.2.post_norms.1.0.weight", 0),         # level-2 extra norms keep ratio 1
    ("conv_head.0.weight", 0),
    ("head.weight", 0),
    ("clip_projector.cross_dcn.q_bias", 0),
])
def test_blocks_after_counts_the_blocks_above_each_parameter(name, k):
    assert blocks_after(name, T_DEPTHS) == k


def test_param_lr_scales_combine_layer_decay_and_the_dcn_multiplier():
    model = create_model("internimage_h", depths=(1, 1, 2, 1), level2_post_norm_block_ids=(1,),
                         channels=40, groups=(1, 2, 4, 8))
    scales = param_lr_scales(model, layer_decay=0.9, dcn_lr_mult=0.1)
    assert scales.keys() == dict(model.named_parameters()).keys()
    assert scales["levels.0.blocks.0.dcn.input_proj.weight"] == pytest.approx(0.9 ** 4)
    assert scales["levels.0.blocks.0.dcn.offset.weight"] == pytest.approx(0.9 ** 4 * 0.1)
    assert scales["levels.2.blocks.1.dcn.center_feature_scale_proj_bias"] == pytest.approx(0.9 * 0.1)
    assert scales["levels.2.blocks.1.dcn.mask.weight"] == pytest.approx(0.9)
    assert scales["levels.3.blocks.0.mlp.fc1.weight"] == 1.0
    assert scales["head.weight"] == 1.0


def test_no_weight_decay_on_biases_and_one_dimensional_parameters():
    assert no_weight_decay("levels.0.blocks.0.norm1.0.weight", torch.ones(4))
    assert no_weight_decay("levels.0.blocks.0.gamma1", torch.ones(4))
    assert no_weight_decay("levels.0.blocks.0.dcn.offset.bias", torch.ones(4))
    assert not no_weight_decay("levels.0.blocks.0.dcn.offset.weight", torch.ones(4, 4))
    assert not no_weight_decay("patch_embed.conv1.weight", torch.ones(4, 3, 3, 3))
