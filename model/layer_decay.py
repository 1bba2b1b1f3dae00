"""Per-parameter learning-rate scales for layer-wise LR decay and the DCN multiplier (docs/model.md §2)."""
from __future__ import annotations

import re

from torch import Tensor, nn

_BLOCK = re.compile(r"^levels\.(\d+)\.blocks\.(\d+)\.")
_STAGE_PART = re.compile(r"^levels\.(\d+)\.(downsample|norm)\.")
_DCN_MULTIPLIED = re.compile(r"\.dcn\.(offset\.|center_feature_scale_proj_)")


def blocks_after(name: str, depths: tuple[int, ...]) -> int:
    """k in ratio = decay^k: how many blocks of the whole network come after the one ``name`` belongs to.

    The stem belongs to block 0 of stage 0; a stage's downsample and norm to block 0 of the next
    stage; heads, the last stage's norm and the level-2 extra norms to the top (k = 0).
    """
    total = sum(depths)
    match = _BLOCK.match(name)
    if match:
        stage, block = int(match[1]), int(match[2])
        return total - 1 - (sum(depths[:stage]) + block)
    if name.startswith("patch_embed."):
        return total - 1
    match = _STAGE_PART.match(name)
    if match and int(match[1]) + 1 < len(depths):
        return total - 1 - sum(depths[:int(match[1]) + 1])
    return 0


def param_lr_scales(model: nn.Module, layer_decay: float = 1.0, dcn_lr_mult: float = 1.0) -> dict[str, float]:
    """Parameter name → LR multiplier: layer_decay^k (see ``blocks_after``) times ``dcn_lr_mult`` for
    the offset Linears and centre-feature-scale parameters."""
    depths = model.arch.depths
    scales = {}
    for name, _ in model.named_parameters():
        scale = layer_decay ** blocks_after(name, depths)
        if _DCN_MULTIPLIED.search(name):
            scale *= dcn_lr_mult
        scales[name] = scale
    return scales


def no_weight_decay(name: str, param: Tensor) -> bool:
    """Biases and every 1-D parameter (norms, layer scales, attention biases) get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias")
