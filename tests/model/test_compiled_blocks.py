"""Regional compilation of the blocks (``InternImage.compile_blocks``) and the channels-last stem input:
same values as the eager model, one graph per distinct block, no graph breaks, no recompiles.

Single process, dynamo's ``eager`` backend: it traces exactly what inductor would be handed (graph
breaks, guards, one graph per distinct block) without generating code. AOTAutograd and inductor
run under ZeRO-3 in tests/pretrain/test_speed_switches.py."""
import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from internimage.model import count_flops, create_model

# Pre-norm (T), post-norm with layer scale (S), res-post-norm with centre feature scale, a 5×5
# offset conv and the clip head (H): every form the compiled function branches on.
FORMS = ["internimage_t", "internimage_s", "internimage_h"]
TINY = {"internimage_t": dict(channels=8, groups=(1, 1, 2, 2), depths=(2, 1, 2, 1)),
        "internimage_s": dict(channels=8, groups=(1, 1, 2, 2), depths=(2, 1, 2, 1)),
        "internimage_h": dict(channels=8, groups=(1, 1, 2, 2), depths=(2, 1, 2, 1), clip_dim=16,
                              clip_out_dim=16, clip_heads=2, level2_post_norm_block_ids=(0,))}


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _step(model, image, seed):
    torch.manual_seed(seed)  # the same stochastic-depth draws for both models
    model.zero_grad()
    logits = model(image)
    logits.square().sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", FORMS)
def test_compiled_blocks_equal_eager_share_graphs_and_never_recompile(name):
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = create_model(name, num_classes=5, drop_path_rate=0.3, **TINY[name]).train()
    eager.set_grad_checkpointing([True, False, True, False])
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks("eager")
    image = torch.randn(2, 3, 32, 32)
    for seed in range(2):
        expected_logits, expected_grads = _step(eager, image, seed)
        logits, grads = _step(compiled, image, seed)
        assert torch.equal(logits, expected_logits)
        assert grads.keys() == expected_grads.keys()
        assert all(torch.equal(grads[k], expected_grads[k]) for k in grads)
        if seed == 0:
            # 6 blocks, 5 graphs: one per stage width, and stage 0's first block (drop rate 0, no
            # factors) apart; the two blocks of stage 2 (different rates) share one.
            assert _graphs() == 5
    assert _graphs() == 5, "a later step recompiled"
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    if name != "internimage_t":
        return
    eager.eval(), compiled.eval()
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(compiled(image), eager(image))
    assert _graphs() == 5 + 4, "evaluation: one graph per stage, once"


def test_a_compiled_model_keeps_its_state_dict_keys_and_counts_its_flops():
    """fvcore counts by torch.jit.trace, which cannot enter a compiled function."""
    model = create_model("internimage_t", num_classes=5, **TINY["internimage_t"])
    keys, flops = list(model.state_dict()), count_flops(model, 32)
    model.compile_blocks("eager")
    assert list(model.state_dict()) == keys
    assert count_flops(model, 32) == flops


def test_an_unknown_backend_is_refused_with_the_known_ones():
    model = create_model("internimage_t", num_classes=5, **TINY["internimage_t"])
    with pytest.raises(ValueError, match="unknown torch.compile backend 'inductr'.*inductor"):
        model.compile_blocks("inductr")


@pytest.mark.parametrize("name", ["internimage_t", "internimage_h"])
def test_channels_last_stem_input_leaves_logits_and_gradients_unchanged(name):
    torch.manual_seed(0)
    plain = create_model(name, num_classes=5, drop_path_rate=0.0, **TINY[name]).train()
    fast = copy.deepcopy(plain)
    fast.set_channels_last()
    seen = []
    fast.patch_embed.conv1.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    image = torch.randn(2, 3, 32, 32)
    expected_logits, expected_grads = _step(plain, image, 0)
    logits, grads = _step(fast, image, 0)
    assert seen == [True], "the stem's first convolution did not get channels-last memory"
    # fp32; only the convolution kernels' summation order may differ.
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    for key in expected_grads:
        torch.testing.assert_close(grads[key], expected_grads[key], rtol=1e-4, atol=1e-5, msg=key)
