"""Per-rank fine-tuning entry: ``python -m internimage.pretrain.finetune [CONFIG] [key=value ...]``.

Started once per rank by the ``deepspeed`` launcher (``launch/finetune.sh``); the stages and their
configs are ``finetuning.py``'s.
"""
from __future__ import annotations

import os
import sys

from .entry import run_entry
from .finetuning import load_finetune_config, make_run_dir_and_finetune

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    def load(path, overrides):
        return load_finetune_config(path, overrides, int(os.environ.get("WORLD_SIZE", "1")))
    return run_entry(argv, load, make_run_dir_and_finetune)


if __name__ == "__main__":
    sys.exit(main())
