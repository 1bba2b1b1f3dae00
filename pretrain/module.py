"""The one ``nn.Module`` handed to DeepSpeed: image model + text tower + objective parameters.

Its ``forward`` does all the work (features, heads, losses) because under ZeRO-3 only module
forwards gather partitioned parameters; calling other methods of a partitioned model from outside
is fragile.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .objectives import clip_loss, soft_target_cross_entropy

__all__ = ["IMAGE_PREFIX", "PretrainModule"]

IMAGE_PREFIX = "image."  # the image model's parameter names inside the trained module


class PretrainModule(nn.Module):
    """Computes the losses of one objective kind on a device batch.

    Args:
        image_model: an InternImage (``forward_features``, ``forward_head``, ``head``,
            ``num_features``).
        kind: "supervised", "contrastive" or "mixed".
        text_model: the text tower (B, L) → (B, embed_dim); required unless supervised.
        embed_dim: joint image-text embedding size.
    """

    def __init__(self, image_model: nn.Module, kind: str, text_model: nn.Module | None = None,
                 embed_dim: int = 512, init_temperature: float = 0.07, max_logit_scale: float = 100.0,
                 supervised_weight: float = 1.0, contrastive_weight: float = 1.0,
                 gather_features: bool = True):
        super().__init__()
        if kind not in ("supervised", "contrastive", "mixed"):
            raise ValueError(f"objective kind must be supervised, contrastive or mixed, got {kind!r}")
        if kind != "supervised" and text_model is None:
            raise ValueError(f"objective {kind!r} needs a text tower")
        self.kind = kind
        self.image = image_model
        self.text = text_model if kind != "supervised" else None
        self.weights = {"supervised": supervised_weight, "contrastive": contrastive_weight}
        self.gather_features = gather_features
        self.max_log_scale = math.log(max_logit_scale)
        if self.text is not None:
            self.image_projection = nn.Linear(image_model.num_features, embed_dim, bias=False)
            nn.init.normal_(self.image_projection.weight, std=image_model.num_features ** -0.5)
            # Shape (1,), not (): DeepSpeed's broadcast cannot view 0-d bf16 tensors as bytes.
            self.log_logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))

    @property
    def uses_supervised(self) -> bool:
        return self.kind in ("supervised", "mixed")

    @property
    def uses_contrastive(self) -> bool:
        return self.kind in ("contrastive", "mixed")

    def forward(self, image: Tensor | None = None, target: Tensor | None = None, label: Tensor | None = None,
                text: Tensor | None = None, evaluate: bool = False) -> dict[str, Tensor]:
        """image (B,3,S,S) float; target (B, classes) soft targets; label (B,) int64 with −1 for
        "no class"; text (B, L) int64 with all-zero rows for "no caption".

        Returns {"loss": weighted total, "supervised": …, "contrastive": …, "logits": (B, classes)
        when supervised}; losses are fp32 scalars. ``evaluate``: see ``_evaluate``.
        """
        if evaluate:
            return self._evaluate(image, text)
        features = self.image.forward_features(image)
        pooled = self.image.forward_head(features, pre_logits=True)
        out: dict[str, Tensor] = {}
        total = pooled.new_zeros((), dtype=torch.float32)
        if self.uses_supervised:
            logits = self.image.head(pooled)
            has_class = label >= 0 if label is not None else None
            out["supervised"] = soft_target_cross_entropy(logits, target, has_class)
            out["logits"] = logits.detach()
            total = total + self.weights["supervised"] * out["supervised"]
        if self.uses_contrastive:
            has_caption = (text != 0).any(dim=1)
            image_emb = self.image_projection(pooled)
            text_emb = self.text(text)
            scale = self.log_logit_scale.float().clamp(max=self.max_log_scale).exp()
            out["contrastive"] = clip_loss(image_emb, text_emb, scale, has_caption, self.gather_features)
            out["logit_scale"] = scale.detach().squeeze()
            total = total + self.weights["contrastive"] * out["contrastive"]
        out["loss"] = total
        return out

    def _evaluate(self, image: Tensor | None, text: Tensor | None) -> dict[str, Tensor]:
        """What evaluation reads, unnormalised, in the compute dtype: for an image batch (image not
        None) "logits" (B, classes) when supervised and "image_embedding" (B, embed_dim) when
        contrastive; for a token batch (text (B, L) not None) "text_embedding" (B, embed_dim)."""
        out: dict[str, Tensor] = {}
        if image is not None:
            pooled = self.image.forward_head(self.image.forward_features(image), pre_logits=True)
            if self.uses_supervised:
                out["logits"] = self.image.head(pooled)
            if self.uses_contrastive:
                out["image_embedding"] = self.image_projection(pooled)
        if text is not None and self.uses_contrastive:
            out["text_embedding"] = self.text(text)
        return out
