"""Losses on one process, against their textbook definitions."""
import math

import torch
import torch.nn.functional as F

from internimage.model.text_tower import TextTransformer
from internimage.pretrain.module import PretrainModule
from internimage.pretrain.objectives import clip_loss, soft_target_cross_entropy


def test_soft_target_ce_equals_cross_entropy_for_one_hot_targets_and_skips_invalid_rows():
    logits = torch.randn(6, 5)
    labels = torch.tensor([0, 3, 1, 4, 2, 2])
    valid = torch.tensor([True, True, False, True, True, False])
    loss = soft_target_cross_entropy(logits, F.one_hot(labels, 5).float(), valid)
    assert torch.allclose(loss, F.cross_entropy(logits[valid], labels[valid]))


def test_clip_loss_equals_symmetric_infonce_over_captioned_pairs():
    image, text = torch.randn(5, 8), torch.randn(5, 8)
    valid = torch.tensor([True, False, True, True, True])
    loss = clip_loss(image, text, torch.tensor(10.0), valid, gather=False)
    i, t = F.normalize(image[valid], dim=-1), F.normalize(text[valid], dim=-1)
    logits = 10.0 * i @ t.t()
    target = torch.arange(4)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    assert torch.allclose(loss, expected, atol=1e-6)


def test_mixed_module_trains_both_objectives_from_their_own_rows():
    torch.manual_seed(0)
    from internimage.model import create_model
    image = create_model("internimage_t", num_classes=4, channels=8, depths=(1, 1, 1, 1), groups=(1, 1, 2, 2))
    text = TextTransformer(vocab_size=30, context_length=6, width=16, layers=1, heads=2, embed_dim=12)
    module = PretrainModule(image, "mixed", text, embed_dim=12, init_temperature=0.07)
    labels = torch.tensor([1, -1, 3, -1])
    tokens = torch.tensor([[0] * 6, [5, 6, 7, 0, 0, 0], [0] * 6, [8, 9, 0, 0, 0, 0]])
    out = module(image=torch.randn(4, 3, 32, 32), target=F.one_hot(labels.clamp(min=0), 4).float(),
                 label=labels, text=tokens)
    assert set(out) >= {"loss", "supervised", "contrastive", "logits"}
    assert torch.allclose(out["loss"], out["supervised"] + out["contrastive"])
    assert math.isclose(out["logit_scale"].item(), 1 / 0.07, rel_tol=1e-5)
    out["loss"].backward()
    assert module.log_logit_scale.grad is not None and module.text.token_embedding.weight.grad.abs().sum() > 0
