"""Export consolidated fp32 image-model weights from a run's sharded checkpoint.

    python -m internimage.pretrain.export RUN_DIR --out model.pth [--ema] [--checkpoint TAG_DIR]

Reads the ZeRO shards with DeepSpeed's own ``zero_to_fp32`` (or joins the per-rank EMA shards with
``--ema``), keeps the image model's tensors and saves ``{"model": state_dict, ...}``. Our module
names equal the official InternImage key names, so the file is in the official format and loads
with ``create_model(name, pretrained="model.pth")`` or any official-format consumer.
"""
from __future__ import annotations

import argparse
import sys

from .checkpoint import export_weights

__all__ = ["main"]


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
