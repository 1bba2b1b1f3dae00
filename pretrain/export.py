"""Export consolidated fp32 image-model weights from a run's sharded checkpoint.

    python -m internimage.pretrain.export RUN_DIR --out model.pth [--ema] [--checkpoint TAG_DIR]

Reads the ZeRO shards with DeepSpeed's own ``zero_to_fp32`` (or joins the per-rank EMA shards with
``--ema``), keeps the image model's tensors and saves ``{"model": state_dict, ...}``. Our module
names equal the official InternImage key names, so the file is in the official format and loads
with ``create_model(name, pretrained="model.pth")`` or any official-format consumer.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from .checkpoint import ResumePoint, rank_files, resolve_resume
from .ema import assemble_full_ema
from .engine import IMAGE_PREFIX

__all__ = ["export_weights", "main"]


def _image_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k[len(IMAGE_PREFIX):]: v.float() if v.is_floating_point() else v
           for k, v in state.items() if k.startswith(IMAGE_PREFIX)}
    if not out:
        raise ValueError("checkpoint holds no image-model tensors (no keys under 'image.')")
    return out


def consolidated_state(point: ResumePoint, ema: bool = False) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of the image model (official key names) at ``point``."""
    if ema:
        if not point.state.get("ema"):
            raise ValueError(f"checkpoint {point.tag_dir} holds no EMA (the run had ema.enabled=false)")
        full, _ = assemble_full_ema(rank_files(point))
        return _image_part(full)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return _image_part(get_fp32_state_dict_from_zero_checkpoint(point.root, tag=point.tag))


def export_weights(source: str, out: str, ema: bool = False) -> dict:
    """``source``: a run folder, its checkpoints folder or one checkpoint folder. Writes ``out``;
    returns the saved dict."""
    point = resolve_resume(source, source)
    if point is None:
        raise FileNotFoundError(f"no checkpoint under {source}")
    state = consolidated_state(point, ema)
    cfg = point.state["config"]
    payload = {"model": state, "step": point.state["step"], "ema": ema,
               "model_name": cfg["model"]["name"], "num_classes": cfg["model"]["num_classes"],
               "arch": cfg["model"]["arch"]}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, out)
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="run folder, checkpoints folder or one checkpoint folder")
    parser.add_argument("--out", required=True, help="output .pth")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights")
    args = parser.parse_args(argv)
    payload = export_weights(args.source, args.out, args.ema)
    n = sum(v.numel() for v in payload["model"].values() if v.is_floating_point())
    print(f"wrote {args.out}: {payload['model_name']} step {payload['step']}"
          f"{' (EMA)' if args.ema else ''}, {len(payload['model'])} tensors, {n:,} values")
    return 0


if __name__ == "__main__":
    sys.exit(main())
