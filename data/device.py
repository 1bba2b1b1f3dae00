"""On-device batch transform: normalisation, random erasing, Mixup/CutMix and label smoothing.

Workers hand over uint8 images; here they become float, normalised with the ImageNet mean/std,
random erasing replaces one rectangle of some images by noise (as timm does after normalising on
the device: the workers are the throughput bottleneck, the device does this for free), and the rows
that carry a class are mixed among themselves (row i with its partner in the reversed order of
those rows). Caption rows are never mixed: their image must stay paired with its text. All random
choices are scalars drawn from one seed taken from the caller's ``torch.Generator``, so a seeded
generator makes the transform reproducible on any device.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .config import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> float (B, 3, H, W), (x/255 - mean) / std."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255
    return (images.to(dtype) - mean) / std


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N,) int -> (N, num_classes): 1 - smoothing + smoothing/K on the class, smoothing/K elsewhere."""
    off = smoothing / num_classes
    target = torch.full((labels.shape[0], num_classes), off, device=labels.device, dtype=dtype)
    return target.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator
               ) -> tuple[int, int, int, int]:
    """Box (top, bottom, left, right) of area about (1 - lam) of the image, centre uniform,
    clipped at the borders."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, bottom, left, right


def erase_box(height: int, width: int, rng: np.random.Generator,
              area: tuple[float, float] = (0.02, 1.0 / 3.0),
              log_ratio: tuple[float, float] = (math.log(0.3), math.log(1.0 / 0.3))
              ) -> tuple[int, int, int, int] | None:
    """Random-erasing box (top, left, height, width): area fraction uniform in ``area``, aspect
    log-uniform; None when ten tries find no box that fits."""
    for _ in range(10):
        target = height * width * rng.uniform(*area)
        aspect = math.exp(rng.uniform(*log_ratio))
        erase_h = int(round(math.sqrt(target * aspect)))
        erase_w = int(round(math.sqrt(target / aspect)))
        if 0 < erase_h < height and 0 < erase_w < width:
            top = int(rng.integers(0, height - erase_h + 1))
            left = int(rng.integers(0, width - erase_w + 1))
            return top, left, erase_h, erase_w
    return None


class DeviceTransform:
    """``transform(batch) -> {"image": float (B, 3, S, S), "target": float (B, num_classes)}``.

    Train mode: each image, with probability ``reprob``, gets one random-erasing box filled with
    per-pixel N(0, 1) noise in normalised units (timm's 'pixel' mode); then, with probability
    ``mixup_prob``, the class rows are mixed, by CutMix with probability
    ``mixup_switch_prob`` when both are enabled, else by Mixup; lam ~ Beta(alpha, alpha) (CutMix
    lam is corrected to the clipped box's area); targets are lam * smooth(y) + (1 - lam) *
    smooth(y_partner). Rows without a class get all-zero targets. ``eval=True``: normalise only and
    hard one-hot targets. Other batch keys are passed through unchanged.
    """

    def __init__(self, cfg: DataConfig, num_classes: int, eval: bool = False,
                 generator: torch.Generator | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1")
        self.cfg = cfg
        self.num_classes = num_classes
        self.eval = eval
        self.generator = generator

    def __call__(self, batch: dict, generator: torch.Generator | None = None,
                 eval: bool | None = None) -> dict:
        evaluating = self.eval if eval is None else eval
        images, labels = batch["image"], batch["label"]
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"batch['image'] must be uint8 (B, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        # Labels are -1 (no class) or within the head: the loaders skip other ids as bad_label
        # (checking here would stop the host for the device once per batch).
        out = dict(batch)
        out["image"] = normalise(images)
        has_class = labels >= 0
        smoothing = 0.0 if evaluating else self.cfg.label_smoothing
        target = torch.zeros(labels.shape[0], self.num_classes, device=labels.device)
        rows = has_class.nonzero().flatten()
        target[rows] = smooth_one_hot(labels[rows], self.num_classes, smoothing)
        if not evaluating:
            rng = np.random.default_rng(self._seed(generator or self.generator, images.device))
            self._erase(out["image"], rng)
            if rows.numel() > 1:
                self._mix(out["image"], target, rows, labels, rng)
        out["target"] = target
        return out

    @staticmethod
    def _seed(generator: torch.Generator | None, device: torch.device) -> int:
        gen_device = generator.device if generator is not None else device
        draw = torch.randint(0, 2**62, (1,), generator=generator, device=gen_device)
        return int(draw.item())

    def _erase(self, images: torch.Tensor, rng: np.random.Generator) -> None:
        """Random erasing in place on normalised (B, 3, H, W) images."""
        if self.cfg.reprob <= 0:
            return
        height, width = images.shape[-2:]
        boxes = [(row, erase_box(height, width, rng)) for row in range(images.shape[0])
                 if rng.random() < self.cfg.reprob]
        boxes = [(row, box) for row, box in boxes if box is not None]
        if not boxes:
            return
        noise = torch.Generator(device=images.device)
        noise.manual_seed(int(rng.integers(0, 2**62)))
        for row, (top, left, erase_h, erase_w) in boxes:
            images[row, :, top:top + erase_h, left:left + erase_w] = torch.randn(
                (images.shape[1], erase_h, erase_w), generator=noise, device=images.device,
                dtype=images.dtype)

    def _mix(self, images: torch.Tensor, target: torch.Tensor, rows: torch.Tensor,
             labels: torch.Tensor, rng: np.random.Generator) -> None:
        """Mix in place the class rows of ``images`` and ``target``."""
        cfg = self.cfg
        if (cfg.mixup <= 0 and cfg.cutmix <= 0) or rng.random() >= cfg.mixup_prob:
            return
        use_cutmix = cfg.cutmix > 0 and (cfg.mixup <= 0 or rng.random() < cfg.mixup_switch_prob)
        alpha = cfg.cutmix if use_cutmix else cfg.mixup
        lam = float(rng.beta(alpha, alpha))
        partner = rows.flip(0)
        originals = images[rows]
        if use_cutmix:
            height, width = images.shape[-2:]
            top, bottom, left, right = cutmix_box(height, width, lam, rng)
            mixed = originals.clone()
            mixed[:, :, top:bottom, left:right] = images[partner][:, :, top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / float(height * width)
        else:
            mixed = originals * lam + images[partner] * (1.0 - lam)
        images[rows] = mixed
        smoothing = cfg.label_smoothing
        target[rows] = (lam * smooth_one_hot(labels[rows], self.num_classes, smoothing)
                        + (1.0 - lam) * smooth_one_hot(labels[partner], self.num_classes,
                                                       smoothing))
