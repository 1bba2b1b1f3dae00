"""The DCNv3 module (docs/model.md §3): projections, offset/mask branch, centre feature scale."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from internimage.ops import dcnv3_core_packed, pack_offset_mask

from .layers import layer_norm


class DCNv3(nn.Module):
    """Deformable convolution v3 on channels-last features.

    Args:
        channels: C, split into ``groups`` groups of C / groups channels.
        offset_scale: scales offsets and the kernel grid (2.0 in L/XL).
        dw_kernel_size: kernel of the depthwise conv that predicts offsets and mask (5 in H/G).
        center_feature_scale: blend the output with the projected input by a learned gate (H/G).
    """

    def __init__(self, channels: int, groups: int, offset_scale: float = 1.0, dw_kernel_size: int = 3,
                 center_feature_scale: bool = False, kernel_size: int = 3, stride: int = 1, pad: int = 1,
                 dilation: int = 1, remove_center: bool = False):
        super().__init__()
        if groups < 1 or channels % groups:
            raise ValueError(f"DCNv3: channels={channels} must be divisible by groups={groups}")
        if dw_kernel_size % 2 == 0:
            raise ValueError(f"DCNv3: dw_kernel_size must be odd, got {dw_kernel_size}")
        self.channels, self.groups = channels, groups
        self.offset_scale, self.kernel_size = offset_scale, kernel_size
        self.stride, self.pad, self.dilation, self.remove_center = stride, pad, dilation, remove_center
        self.points = kernel_size * kernel_size - int(remove_center)

        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(groups, channels))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(groups))
        self.center_feature_scale = center_feature_scale
        self.dw_conv = nn.Sequential(
            nn.Conv2d(channels, channels, dw_kernel_size, padding=(dw_kernel_size - 1) // 2, groups=channels),
            layer_norm(channels, in_channels_first=True),
            nn.GELU(),
        )
        self.offset = nn.Linear(channels, groups * self.points * 2)
        self.mask = nn.Linear(channels, groups * self.points)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Regular grid and uniform mask at start; xavier projections (docs/model.md §2)."""
        for linear in (self.offset, self.mask):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        for linear in (self.input_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        if self.center_feature_scale:
            nn.init.zeros_(self.center_feature_scale_proj_weight)
            nn.init.zeros_(self.center_feature_scale_proj_bias)

    def borrowed_parameters(self) -> list[nn.Parameter]:
        """Submodule parameters that ``forward`` reads itself (the one-GEMM path of ``_offset_mask``).
        ZeRO-3 gathers a parameter for its owner's forward; pretrain/engine.py registers these as this
        module's, so they are gathered (and prefetched) with it on either path."""
        return [self.offset.weight, self.offset.bias, self.mask.weight, self.mask.bias]

    def _offset_mask(self, branch: Tensor) -> Tensor:
        """branch (N, H, W, C) → offsets and mask logits (N, H, W, G·P·3), in the layout the op reads
        in place (its gradient comes back as one tensor too).

        Packing costs a copy of G·P·3 entries per row of whichever side is packed: the weights (C rows,
        and their gradients once more) for one GEMM, or the two GEMMs' outputs (N·H·W rows, and their
        gradients split again). One GEMM also reads ``branch`` once and returns one input gradient, so
        it is taken whenever the micro-batch has at least C pixels (N·H·W ≥ C): all but the late
        stages at small images or micro-batches. tests/model/test_dcnv3_zero3.py runs both paths
        under ZeRO-3 with every parameter partitioned.
        """
        if branch.shape[:-1].numel() < self.channels:
            return pack_offset_mask(self.offset(branch), self.mask(branch), self.groups)
        return F.linear(branch, pack_offset_mask(self.offset.weight, self.mask.weight, self.groups, dim=0),
                        pack_offset_mask(self.offset.bias, self.mask.bias, self.groups, dim=0))

    def forward(self, x: Tensor) -> Tensor:
        """(N, H, W, C) → (N, H_out, W_out, C)."""
        projected = self.input_proj(x)
        # (N, H, W, C) read as NCHW in channels-last memory: the conv runs without a layout copy and
        # LN's permute back is a view again.
        branch = self.dw_conv(x.permute(0, 3, 1, 2))  # (N, H, W, C): offsets come from the raw input
        offset_mask = self._offset_mask(branch)
        out = dcnv3_core_packed(projected, offset_mask, kernel_size=(self.kernel_size, self.kernel_size),
                                stride=(self.stride, self.stride), pad=(self.pad, self.pad),
                                dilation=(self.dilation, self.dilation), groups=self.groups,
                                offset_scale=self.offset_scale, remove_center=self.remove_center,
                                softmax_mask=True)
        if self.center_feature_scale:
            # y·(1 − s) + x·s per group, s broadcast over the group's channels (no repeated copy).
            grouped = out.shape[:-1] + (self.groups, self.channels // self.groups)
            gate = torch.sigmoid(F.linear(branch, self.center_feature_scale_proj_weight,
                                          self.center_feature_scale_proj_bias)).unsqueeze(-1)
            out = torch.lerp(out.view(grouped), projected.view(grouped), gate).view(out.shape)
        return self.output_proj(out)
