"""Classification heads: the conv head of T…XL and the clip-projector head of H and G (docs/model.md §2)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import layer_norm

# A classifier that replaces another on pretrained features starts this small: its first logits are
# near zero (near-uniform predictions), so the gradients it sends into the pretrained trunk during
# the first steps are small and do not disturb the features (BEiT/MAE fine-tuning do the same).
NEW_CLASSIFIER_STD = 1e-3


def new_classifier(in_features: int, num_classes: int, device: torch.device | str | None = None) -> nn.Linear:
    """The final Linear that replaces a head: trunc-normal(NEW_CLASSIFIER_STD) weight, zero bias."""
    head = nn.Linear(in_features, num_classes, device=device)
    nn.init.trunc_normal_(head.weight, std=NEW_CLASSIFIER_STD, a=-2 * NEW_CLASSIFIER_STD,
                          b=2 * NEW_CLASSIFIER_STD)
    nn.init.zeros_(head.bias)
    return head


class ConvHead(nn.Sequential):
    """conv 1×1 (c → hidden, no bias) → BatchNorm → GELU → global average pool.

    A Sequential so its keys read ``conv_head.0.weight``, ``conv_head.1.0.running_mean`` as in the
    official checkpoints. The final Linear lives on the model as ``head``, where they keep it.
    """

    def __init__(self, in_channels: int, hidden: int):
        super().__init__(nn.Conv2d(in_channels, hidden, 1, bias=False),
                         nn.Sequential(nn.BatchNorm2d(hidden)), nn.GELU())

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) → (N, hidden)."""
        return super().forward(x).mean((2, 3))


class AttentionPooling(nn.Module):
    """Multi-head attention of one query (the token mean) over all tokens; no residual, no MLP."""

    def __init__(self, dim: int, out_dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"AttentionPooling: dim={dim} must be divisible by heads={heads}")
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.k_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, query: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """query (N, 1, dim), keys/values (N, L, dim) → (N, out_dim)."""
        n, length, dim = keys.shape
        q = nn.functional.linear(query, self.q.weight, self.q_bias)
        k = nn.functional.linear(keys, self.k.weight, self.k_bias)
        v = nn.functional.linear(values, self.v.weight, self.v_bias)
        q = q.reshape(n, 1, self.heads, -1).transpose(1, 2)
        k = k.reshape(n, length, self.heads, -1).transpose(1, 2)
        v = v.reshape(n, length, self.heads, -1).transpose(1, 2)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(n, dim))


class ClipProjector(nn.Module):
    """Attention pooling of the fused stride-16 tokens, each of q/k/v with its own LayerNorm."""

    def __init__(self, dim: int, out_dim: int, heads: int):
        super().__init__()
        self.norm1_q = layer_norm(dim)
        self.norm1_k = layer_norm(dim)
        self.norm1_v = layer_norm(dim)
        self.cross_dcn = AttentionPooling(dim, out_dim, heads)

    def forward(self, tokens: Tensor) -> Tensor:
        """(N, L, dim) → (N, out_dim)."""
        query = tokens.mean(1, keepdim=True)
        return self.cross_dcn(self.norm1_q(query), self.norm1_k(tokens), self.norm1_v(tokens))
