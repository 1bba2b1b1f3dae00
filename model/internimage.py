"""InternImage (docs/model.md §2): stem, block, stage, the network, then its seven variants and ``create_model``.

Tensors between blocks are channels-last (N, H, W, C); the image input and every tensor handed out
(``features_only`` maps, ``forward_features``) are channels-first (N, C, H, W).
Module names follow the official checkpoints, so their state dicts load without renaming.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .dcnv3 import DCNv3
from .heads import ClipProjector, ConvHead, new_classifier
from .layers import DropPath, Mlp, drop_path_rates, init_weights, layer_norm


@dataclass(frozen=True)
class InternImageArch:
    """Everything that distinguishes one InternImage variant from another (docs/model.md §1)."""

    channels: int = 64
    depths: tuple[int, ...] = (4, 4, 18, 4)
    groups: tuple[int, ...] = (4, 8, 16, 32)
    mlp_ratio: float = 4.0
    layer_scale: float | None = None
    offset_scale: float = 1.0
    post_norm: bool = False
    res_post_norm: bool = False
    dw_kernel_size: int = 3
    level2_post_norm_block_ids: tuple[int, ...] = ()
    center_feature_scale: bool = False
    head: str = "conv"  # "conv" (T…XL) or "clip" (clip projector, H and G)
    conv_head_ratio: float = 1.5
    clip_dim: int = 1024
    clip_out_dim: int = 768
    clip_heads: int = 16
    drop_path_rate: float = 0.1  # the recipe's rate, used when create_model gets none

    def stage_channels(self, stage: int) -> int:
        return self.channels * 2 ** stage

    @property
    def has_stage_norm(self) -> bool:
        return not self.post_norm or self.center_feature_scale

    def validate(self) -> None:
        """Raises ValueError naming the offending values."""
        if len(self.depths) != len(self.groups) or not self.depths:
            raise ValueError(f"depths {self.depths} and groups {self.groups} need one entry per stage")
        for stage, groups in enumerate(self.groups):
            width = self.stage_channels(stage)
            if groups < 1 or width % groups:
                raise ValueError(f"stage {stage} has {width} channels (channels={self.channels}·2^{stage}), "
                                 f"not divisible by groups={groups}")
        if self.post_norm and self.res_post_norm:
            raise ValueError("post_norm and res_post_norm are exclusive block forms; set one")
        if self.head not in ("conv", "clip"):
            raise ValueError(f"head must be 'conv' or 'clip', got {self.head!r}")
        if self.head == "clip" and len(self.depths) < 2:
            raise ValueError("the clip head reads the last two stages; it needs at least 2 stages")
        if self.level2_post_norm_block_ids and len(self.depths) < 3:
            raise ValueError("level2_post_norm_block_ids needs a stage 2")
        bad = [i for i in self.level2_post_norm_block_ids if len(self.depths) > 2 and not 0 <= i < self.depths[2]]
        if bad:
            raise ValueError(f"level2_post_norm_block_ids {bad} are outside stage 2's {self.depths[2]} blocks")


class InternImageBlock(nn.Module):
    """DCNv3 then MLP, each residual, in the pre-norm, post-norm or res-post-norm form of docs/model.md §2."""

    def __init__(self, channels: int, groups: int, arch: InternImageArch, drop_path: float):
        super().__init__()
        self.post_norm, self.res_post_norm = arch.post_norm, arch.res_post_norm
        if arch.layer_scale is not None:
            self.gamma1 = nn.Parameter(arch.layer_scale * torch.ones(channels))
            self.gamma2 = nn.Parameter(arch.layer_scale * torch.ones(channels))
        else:
            self.gamma1 = self.gamma2 = None
        self.norm1 = layer_norm(channels)
        self.dcn = DCNv3(channels, groups, arch.offset_scale, arch.dw_kernel_size, arch.center_feature_scale)
        self.drop_path = DropPath(drop_path)
        self.norm2 = layer_norm(channels)
        self.mlp = Mlp(channels, arch.mlp_ratio)
        if arch.res_post_norm:
            self.res_post_norm1 = layer_norm(channels)
            self.res_post_norm2 = layer_norm(channels)
        self.compile_backend: str | None = None  # set by InternImage.compile_blocks

    def forward(self, x: Tensor) -> Tensor:
        """(N, H, W, C) → (N, H, W, C). Stochastic depth is drawn here, before the residual branches
        (the order of the draws is unchanged), so a compiled block takes the draws as inputs: every
        block of a stage then runs one graph whatever its drop rate, which a graph would otherwise
        hold as a constant."""
        # torch.jit.trace (fvcore's FLOP count) cannot enter a compiled function: it traces the eager one.
        eager = self.compile_backend is None or torch.jit.is_tracing()
        residuals = _block_residuals if eager else _compiled_residuals(self.compile_backend)
        return residuals(self, x, self.drop_path.scale(x), self.drop_path.scale(x))


def _scaled(gamma: Tensor | None, x: Tensor) -> Tensor:
    return x if gamma is None else gamma * x


def _dropped(branch: Tensor, scale: Tensor | None) -> Tensor:
    return branch if scale is None else branch * scale


def _block_residuals(block: InternImageBlock, x: Tensor, drop1: Tensor | None, drop2: Tensor | None) -> Tensor:
    """The block's two residual branches; ``drop1``/``drop2``: the stochastic-depth factors of each
    (``DropPath.scale``). The region ``compile_blocks`` compiles."""
    if block.post_norm:
        x = x + _dropped(_scaled(block.gamma1, block.norm1(block.dcn(x))), drop1)
        return x + _dropped(_scaled(block.gamma2, block.norm2(block.mlp(x))), drop2)
    if block.res_post_norm:
        x = x + _dropped(block.res_post_norm1(block.dcn(block.norm1(x))), drop1)
        return x + _dropped(block.res_post_norm2(block.mlp(block.norm2(x))), drop2)
    x = x + _dropped(_scaled(block.gamma1, block.dcn(block.norm1(x))), drop1)
    return x + _dropped(_scaled(block.gamma2, block.mlp(block.norm2(x))), drop2)


@functools.lru_cache(maxsize=None)
def _compiled_residuals(backend: str):
    """One compiled ``_block_residuals`` per backend, shared by every block: blocks of equal width
    reuse its graphs (one per stage × training/evaluation × batch shape, static shapes). Not
    ``fullgraph``: that would turn dynamo's recompile limit (an unforeseen batch shape) into an
    error mid-run instead of an eager fallback; the tests count the graph breaks (none)."""
    return torch.compile(_block_residuals, backend=backend, dynamic=False)


class Stem(nn.Module):
    """Stride-4 stem: two conv 3×3 s2 with LayerNorm, GELU between. (N, 3, H, W) → (N, H/4, W/4, C)."""

    def __init__(self, in_chans: int, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, channels // 2, 3, stride=2, padding=1)
        self.norm1 = layer_norm(channels // 2, in_channels_first=True, out_channels_first=True)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(channels // 2, channels, 3, stride=2, padding=1)
        self.norm2 = layer_norm(channels, in_channels_first=True)
        self.channels_last_input = False  # set by InternImage.set_channels_last

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last_input:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class Downsample(nn.Module):
    """conv 3×3 s2 (c → 2c, no bias) then LayerNorm. (N, H, W, c) → (N, H/2, W/2, 2c)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False)
        self.norm = layer_norm(2 * channels, in_channels_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)))


class InternImageStage(nn.Module):
    """Blocks at one width, the optional stage norm and level-2 extra norms, then a downsample."""

    def __init__(self, stage: int, arch: InternImageArch, drop_paths: Sequence[float], downsample: bool):
        super().__init__()
        channels = arch.stage_channels(stage)
        self.blocks = nn.ModuleList(InternImageBlock(channels, arch.groups[stage], arch, rate)
                                    for rate in drop_paths)
        self.norm = layer_norm(channels) if arch.has_stage_norm else None
        self.post_norm_block_ids = tuple(arch.level2_post_norm_block_ids) if stage == 2 else ()
        self.post_norms = (nn.ModuleList(layer_norm(channels) for _ in self.post_norm_block_ids)
                           if self.post_norm_block_ids else None)
        self.downsample = Downsample(channels) if downsample else None
        self.checkpointed = [False] * len(self.blocks)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(N, H, W, c) → (stage output (N, H, W, c), input of the next stage (N, H/2, W/2, 2c))."""
        for index, block in enumerate(self.blocks):
            if self.checkpointed[index] and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if index in self.post_norm_block_ids:
                x = self.post_norms[self.post_norm_block_ids.index(index)](x)
        if self.norm is not None:
            x = self.norm(x)
        return x, (self.downsample(x) if self.downsample is not None else x)


class InternImage(nn.Module):
    """The InternImage backbone with its classification head, or a multi-scale feature extractor.

    Args:
        arch: the variant (see ``VARIANTS``).
        num_classes: size of the final Linear; 0 leaves ``head`` an Identity (pooled features out).
        drop_path_rate: stochastic depth at the last block; None takes the variant recipe's rate.
        features_only: build no head; ``forward`` returns the NCHW stage outputs of ``out_indices``.
        in_chans: image channels.
    """

    def __init__(self, arch: InternImageArch, num_classes: int = 1000, drop_path_rate: float | None = None,
                 features_only: bool = False, out_indices: Sequence[int] = (0, 1, 2, 3), in_chans: int = 3):
        super().__init__()
        arch.validate()
        self.arch, self.num_classes, self.features_only = arch, num_classes, features_only
        num_stages = len(arch.depths)
        self.out_indices = tuple(out_indices)
        if any(not 0 <= i < num_stages for i in self.out_indices):
            raise ValueError(f"out_indices {self.out_indices} must lie in 0..{num_stages - 1}")
        rates = drop_path_rates(arch.depths, arch.drop_path_rate if drop_path_rate is None else drop_path_rate)

        self.patch_embed = Stem(in_chans, arch.channels)
        self.levels = nn.ModuleList(InternImageStage(i, arch, rates[i], downsample=i < num_stages - 1)
                                    for i in range(num_stages))
        self.feature_info = [{"num_chs": arch.stage_channels(i), "reduction": 4 * 2 ** i, "module": f"levels.{i}"}
                             for i in range(num_stages)]
        if not features_only:
            self._build_head(arch, num_classes)
        self.apply(init_weights)
        for module in self.modules():
            if isinstance(module, DCNv3):
                module.reset_parameters()

    def _build_head(self, arch: InternImageArch, num_classes: int) -> None:
        last = arch.stage_channels(len(arch.depths) - 1)
        if arch.head == "conv":
            self.num_features = int(last * arch.conv_head_ratio)
            self.conv_head = ConvHead(last, self.num_features)
        else:
            self.num_features = arch.clip_out_dim
            self.dcnv3_head_x4 = nn.Sequential(nn.Conv2d(last, arch.clip_dim * 4, 1), nn.PixelShuffle(2))
            self.dcnv3_head_x3 = nn.Conv2d(last // 2, arch.clip_dim, 1)
            self.clip_projector = ClipProjector(arch.clip_dim, arch.clip_out_dim, arch.clip_heads)
            self.fc_norm = layer_norm(arch.clip_out_dim)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # -- forward ------------------------------------------------------------------------------
    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """(N, 3, H, W) → per stage its output, channels-last (N, H/4/2^i, W/4/2^i, C·2^i)."""
        x = self.patch_embed(x)
        outputs = []
        for level in self.levels:
            out, x = level(x)
            outputs.append(out)
        return outputs

    def forward_features(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor] | list[Tensor]:
        """What the head reads, channels-first: the last stage map (conv head), the last two stage maps
        (clip head), or the maps of ``out_indices`` (features_only)."""
        stages = [out.permute(0, 3, 1, 2) for out in self.forward_stages(x)]
        if self.features_only:
            return [stages[i] for i in self.out_indices]
        if self.arch.head == "conv":
            return stages[-1]
        return stages[-2], stages[-1]

    def forward_head(self, features, pre_logits: bool = False) -> Tensor:
        """``forward_features``' output → logits (N, num_classes), or the pooled (N, num_features)."""
        if self.features_only:
            raise RuntimeError("this model was built with features_only=True and has no head")
        if self.arch.head == "conv":
            pooled = self.conv_head(features)
        else:
            x3, x4 = features
            tokens = (self.dcnv3_head_x4(x4) + self.dcnv3_head_x3(x3)).flatten(2).transpose(1, 2)
            pooled = self.fc_norm(self.clip_projector(tokens))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: Tensor):
        """(N, 3, H, W) → logits (N, num_classes); with features_only the list of NCHW stage maps."""
        if self.features_only:
            return self.forward_features(x)
        return self.forward_head(self.forward_features(x))

    # -- timm-like utilities ------------------------------------------------------------------
    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the final Linear by a new one (``heads.new_classifier``: small, so it does not
        disturb pretrained features); 0 makes it an Identity."""
        if self.features_only:
            raise RuntimeError("a features_only model has no classifier to reset")
        self.num_classes = num_classes
        device = next(self.parameters()).device
        self.head = new_classifier(self.num_features, num_classes, device) if num_classes > 0 else nn.Identity()

    def set_grad_checkpointing(self, enable: bool | Sequence[bool] = True, every: int = 1) -> None:
        """Activation checkpointing per block: ``enable`` for all stages or one flag per stage;
        within an enabled stage every ``every``-th block (0, k, 2k…) is checkpointed."""
        flags = [bool(enable)] * len(self.levels) if isinstance(enable, bool) else [bool(f) for f in enable]
        if len(flags) != len(self.levels) or every < 1:
            raise ValueError(f"set_grad_checkpointing needs one flag per stage ({len(self.levels)}) and every >= 1, "
                             f"got enable={enable!r}, every={every}")
        for level, flag in zip(self.levels, flags):
            level.checkpointed = [flag and index % every == 0 for index in range(len(level.blocks))]

    def compile_blocks(self, backend: str = "inductor") -> None:
        """Regional compilation: every block's residual branches run through one ``torch.compile``d
        function (``backend``), whose graphs blocks of equal width share, so compiling InternImage-H
        costs one graph per stage, not per block. The stem, downsampling layers and head stay eager.
        Module names and state-dict keys are unchanged (nothing is wrapped). Under ZeRO-3 each block
        must gather its parameters as a whole (``pretrain.engine`` marks the blocks as ZeRO-3 leaf
        modules): per-submodule hooks inside the compiled region would break its graph."""
        import torch._dynamo
        known = torch._dynamo.list_backends(exclude_tags=())
        if backend not in known:
            raise ValueError(f"unknown torch.compile backend {backend!r}; known: {', '.join(known)}")
        for level in self.levels:
            for block in level.blocks:
                block.compile_backend = backend
        # Graphs per stage: with/without stochastic depth × training/evaluation × a full and a
        # partial last batch; dynamo's default limit (8 per function) would send later stages to eager.
        limit = 8 * len(self.levels)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)

    def set_channels_last(self, enable: bool = True) -> None:
        """The image enters the stem in channels-last memory (N, C, H, W viewed over NHWC storage),
        so the stem's first convolution runs in the NHWC layout GPU convolutions prefer and its
        output needs no transpose before the LayerNorm. Every later convolution already receives
        channels-last memory (the (N, H, W, C) features permuted). Values are unchanged."""
        self.patch_embed.channels_last_input = bool(enable)

    def head_module_names(self) -> tuple[str, ...]:
        """Top-level modules that form the classification head (not part of the backbone)."""
        return ("conv_head", "head", "dcnv3_head_x3", "dcnv3_head_x4", "clip_projector", "fc_norm")


# -- variants (docs/model.md §1) -----------------------------------------------------------------------
_POST_NORM_LAYER_SCALE = dict(layer_scale=1e-5, post_norm=True)
_H_G_FEATURES = dict(dw_kernel_size=5, center_feature_scale=True, head="clip")

VARIANTS: dict[str, InternImageArch] = {
    "internimage_t": InternImageArch(64, (4, 4, 18, 4), (4, 8, 16, 32), drop_path_rate=0.1),
    "internimage_s": InternImageArch(80, (4, 4, 21, 4), (5, 10, 20, 40), drop_path_rate=0.4,
                                     **_POST_NORM_LAYER_SCALE),
    "internimage_b": InternImageArch(112, (4, 4, 21, 4), (7, 14, 28, 56), drop_path_rate=0.5,
                                     **_POST_NORM_LAYER_SCALE),
    "internimage_l": InternImageArch(160, (5, 5, 22, 5), (10, 20, 40, 80), offset_scale=2.0,
                                     drop_path_rate=0.1, **_POST_NORM_LAYER_SCALE),
    "internimage_xl": InternImageArch(192, (5, 5, 24, 5), (12, 24, 48, 96), offset_scale=2.0,
                                      drop_path_rate=0.2, **_POST_NORM_LAYER_SCALE),
    "internimage_h": InternImageArch(320, (6, 6, 32, 6), (10, 20, 40, 80), res_post_norm=True,
                                     level2_post_norm_block_ids=(5, 11, 17, 23, 29), drop_path_rate=0.2,
                                     **_H_G_FEATURES),
    "internimage_g": InternImageArch(512, (2, 2, 48, 4), (16, 32, 64, 128), post_norm=True,
                                     level2_post_norm_block_ids=(5, 11, 17, 23, 29, 35, 41, 47),
                                     drop_path_rate=0.4, **_H_G_FEATURES),
}


def arch_with_overrides(name: str, **overrides) -> InternImageArch:
    """The named variant's architecture with fields replaced (e.g. a reduced-depth copy for tests)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(VARIANTS)}")
    fields = {f.name for f in dataclasses.fields(InternImageArch)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown architecture override(s) {unknown}; valid: {sorted(fields)}")
    for key in ("depths", "groups", "level2_post_norm_block_ids"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    return dataclasses.replace(VARIANTS[name], **overrides)
