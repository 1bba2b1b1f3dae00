"""The text tower: shapes, padding never changes a caption's embedding, real tokens do."""
import pytest
import torch

from internimage.model.text_tower import TextTransformer


def _tower(**kw):
    torch.manual_seed(0)
    args = dict(vocab_size=50, context_length=16, width=32, layers=2, heads=4, embed_dim=24)
    args.update(kw)
    return TextTransformer(**args).eval()


def test_embeds_each_caption_to_embed_dim():
    tokens = torch.randint(1, 50, (3, 16))
    assert _tower()(tokens).shape == (3, 24)


def test_trailing_padding_leaves_embedding_unchanged():
    tower = _tower()
    caption = torch.tensor([[5, 9, 13, 2]])
    padded = torch.cat([caption, torch.zeros(1, 12, dtype=torch.long)], dim=1)
    torch.testing.assert_close(tower(caption), tower(padded))


def test_embedding_uses_the_last_real_token_not_position_zero():
    tower = _tower()
    a = torch.tensor([[5, 9, 13, 2, 0, 0]])
    b = torch.tensor([[5, 9, 13, 7, 0, 0]])
    assert not torch.allclose(tower(a), tower(b))


def test_gradients_reach_every_parameter():
    tower = _tower().train()
    tower(torch.randint(1, 50, (2, 10))).square().sum().backward()
    missing = [n for n, p in tower.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_rejects_tokens_longer_than_context():
    with pytest.raises(ValueError, match="context_length|L ≤ 16"):
        _tower()(torch.ones(1, 17, dtype=torch.long))
