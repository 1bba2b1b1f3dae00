"""Small building blocks shared by the networks: layout permutes, norms, drop path, MLP.

Norms are wrapped in ``nn.Sequential`` the way the official checkpoints name them (``norm1.0``,
``downsample.norm.1``...), so our state dicts carry the official key names unchanged.
"""
from __future__ import annotations

from torch import Tensor, nn

LAYER_NORM_EPS = 1e-6


class ToChannelsLast(nn.Module):
    """(N, C, H, W) → (N, H, W, C)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


class ToChannelsFirst(nn.Module):
    """(N, H, W, C) → (N, C, H, W)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 3, 1, 2)


def layer_norm(channels: int, in_channels_first: bool = False, out_channels_first: bool = False) -> nn.Sequential:
    """LayerNorm over channels, with permutes around it when a side is channels-first (N, C, H, W)."""
    layers: list[nn.Module] = [ToChannelsLast()] if in_channels_first else []
    layers.append(nn.LayerNorm(channels, eps=LAYER_NORM_EPS))
    if out_channels_first:
        layers.append(ToChannelsFirst())
    return nn.Sequential(*layers)


class DropPath(nn.Module):
    """Stochastic depth: zeroes whole samples of a residual branch with probability ``drop_prob``."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def scale(self, x: Tensor) -> Tensor | None:
        """Per-sample factors (N, 1, …, 1) in ``x``'s dtype for a branch shaped like ``x``: 0 (dropped)
        or 1 / keep; None when nothing is dropped (evaluation, or rate 0). Drawn from torch's default
        generator, so the same seed draws the same samples eagerly and in a compiled block."""
        if self.drop_prob == 0.0 or not self.training:
            return None
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return x.new_empty(shape).bernoulli_(keep).div_(keep)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.scale(x)
        return x if scale is None else x * scale

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Mlp(nn.Module):
    """Linear(c → ratio·c) → GELU → Linear(ratio·c → c) on channels-last tensors."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def init_weights(module: nn.Module) -> None:
    """docs/model.md §2 init: Linear trunc-normal(0.02) with zero bias, LayerNorm weight 1 and bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def drop_path_rates(depths: tuple[int, ...], rate: float) -> list[list[float]]:
    """Per stage, per block: drop-path rising linearly from 0 to ``rate`` over all blocks."""
    total = sum(depths)
    flat = [rate * i / (total - 1) for i in range(total)] if total > 1 else [0.0] * total
    out, start = [], 0
    for depth in depths:
        out.append(flat[start:start + depth])
        start += depth
    return out
