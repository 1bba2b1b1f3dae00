"""A small causal text transformer for image-text contrastive pretraining (CLIP-style text encoder).

Tokens are int64 ids with 0 as padding at the end of each row. Attention is causal, so padding
never influences a real token; the embedding of a caption is the final-norm feature of its last
real token, projected to ``embed_dim``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TextTransformer"]


class _CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} must be divisible by heads {heads}.")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = _CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TextTransformer(nn.Module):
    """Causal pre-norm transformer: tokens (B, L) int64 → caption embeddings (B, embed_dim).

    Rows that are all padding (no caption) still produce a vector (from position 0); callers
    mask them out of the loss.
    """

    def __init__(self, vocab_size: int, context_length: int, width: int = 512, layers: int = 12,
                 heads: int = 8, embed_dim: int = 512):
        super().__init__()
        if vocab_size < 2 or context_length < 1:
            raise ValueError(f"need vocab_size ≥ 2 and context_length ≥ 1, got {vocab_size}, "
                             f"{context_length}.")
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, width))
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.final_norm = nn.LayerNorm(width)
        self.projection = nn.Linear(width, embed_dim, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"tokens must be (B, L ≤ {self.context_length}), got "
                             f"{tuple(tokens.shape)}.")
        n = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:n]
        for block in self.blocks:
            x = block(x)
        x = self.final_norm(x)
        last = (tokens != 0).sum(dim=1).clamp(min=1) - 1
        pooled = x[torch.arange(x.shape[0], device=x.device), last]
        return self.projection(pooled)
