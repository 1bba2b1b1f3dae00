"""Losses: soft-target cross-entropy (supervised) and the CLIP contrastive loss across ranks.

Both are normalised by the number of contributing samples over *all* ranks (times the world
size), so that DeepSpeed's gradient averaging yields exactly the gradient of the global mean loss,
however unevenly a mixed stream spreads class and caption samples over the ranks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .distributed import gather_rows, gather_rows_with_grad, rank, sum_tensor_over_ranks, world_size

__all__ = ["clip_loss", "global_count", "soft_target_cross_entropy"]


def global_count(mask: Tensor) -> Tensor:
    """Number of True entries of ``mask`` summed over all ranks (float scalar, no grad)."""
    return sum_tensor_over_ranks(mask.sum().to(torch.float32))


def soft_target_cross_entropy(logits: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean over valid samples (over all ranks) of −Σ_c target·log_softmax(logits).

    logits, target: (B, C); valid: bool (B,) or None (all valid). Computed in fp32.
    """
    per_sample = -(target.float() * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
    if valid is None:
        valid = torch.ones_like(per_sample, dtype=torch.bool)
    denominator = global_count(valid).clamp(min=1.0) / world_size()
    return (per_sample * valid).sum() / denominator


def clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, valid: Tensor,
              gather: bool = True) -> Tensor:
    """Symmetric InfoNCE between L2-normalised image and text embeddings.

    image_emb, text_emb: (B, E) on this rank; logit_scale: scalar multiplier (already exp'd);
    valid: bool (B,) — pairs that have a caption. With ``gather``, each local pair is contrasted
    against the pairs of every rank (invalid ones masked out of the negatives).
    """
    image = F.normalize(image_emb.float(), dim=-1)
    text = F.normalize(text_emb.float(), dim=-1)
    if gather and world_size() > 1:
        all_image, all_text = gather_rows_with_grad(image), gather_rows_with_grad(text)
        all_valid = gather_rows(valid)
        offset = rank() * image.shape[0]
    else:
        all_image, all_text, all_valid, offset = image, text, valid, 0
    labels = torch.arange(image.shape[0], device=image.device) + offset
    masked = torch.zeros(all_valid.shape, device=image.device, dtype=torch.float32)
    masked = masked.masked_fill(~all_valid, float("-inf"))
    logits_i2t = logit_scale.float() * image @ all_text.t() + masked
    logits_t2i = logit_scale.float() * text @ all_image.t() + masked
    # Rows of invalid pairs would be all -inf at their label: give them a finite dummy target.
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels) + offset)
    loss_i = F.cross_entropy(logits_i2t.masked_fill(~valid[:, None], 0.0), safe_labels, reduction="none")
    loss_t = F.cross_entropy(logits_t2i.masked_fill(~valid[:, None], 0.0), safe_labels, reduction="none")
    per_pair = 0.5 * (loss_i + loss_t) * valid
    denominator = global_count(valid).clamp(min=1.0) / world_size()
    return per_pair.sum() / denominator

