"""``create_model`` and ``list_models``: the timm-like entry points."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import torch

from .internimage import VARIANTS, InternImage, arch_with_overrides
from .official_weights import load_pretrained


def list_models() -> list[str]:
    """Names accepted by ``create_model``."""
    return list(VARIANTS)


def create_model(name: str, num_classes: int = 1000, pretrained: str | Path | bool | None = None,
                 drop_path_rate: float | None = None, with_cp: bool = False, features_only: bool = False,
                 out_indices: Sequence[int] = (0, 1, 2, 3), class_indices: Sequence[int] | None = None,
                 **arch_overrides) -> InternImage:
    """Builds an InternImage variant, optionally loading official-format weights.

    Args:
        name: one of ``list_models()``.
        pretrained: a ``.pth`` or ``.safetensors`` file in the official format (see
            ``load_pretrained``); there is no hub, so ``True`` is an error that says so.
        drop_path_rate: None takes the variant recipe's rate (docs/model.md §1).
        with_cp: activation checkpointing on every block.
        class_indices: with ``pretrained``, rows of the checkpoint's head to keep (e.g. 1000 indices
            that map a 21841-class head to ImageNet-1K).
        arch_overrides: fields of ``InternImageArch`` (depths, channels, groups, ...).
    """
    if pretrained is True:
        raise ValueError(f"create_model({name!r}, pretrained=True): there is no model hub here; pass the "
                         f"path of an official-format checkpoint instead, e.g. pretrained='{name}_1k_224.pth' "
                         "(.pth or .safetensors; see README 'Loading official weights').")
    pretrained = pretrained or None  # pretrained=False: random initialisation, as timm
    arch = arch_with_overrides(name, **arch_overrides)
    # With weights to load, build on the meta device: random initialisation of H/G takes minutes.
    with torch.device("meta") if pretrained is not None else contextlib.nullcontext():
        model = InternImage(arch, num_classes=num_classes, drop_path_rate=drop_path_rate,
                            features_only=features_only, out_indices=out_indices)
    if pretrained is not None:
        load_pretrained(model, pretrained, class_indices=class_indices)
    if with_cp:
        model.set_grad_checkpointing(True)
    return model
