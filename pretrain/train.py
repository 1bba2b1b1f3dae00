"""Per-rank pretraining entry: ``python -m internimage.pretrain.train [CONFIG] [key=value ...]``.

Started once per rank by the ``deepspeed`` launcher (``launch/pretrain.sh``); the work is the
``Trainer`` (``trainer.py``).
"""
from __future__ import annotations

import sys

from .config import load_config
from .entry import run_entry
from .trainer import Trainer

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    return run_entry(argv, load_config, lambda cfg: Trainer(cfg).run())


if __name__ == "__main__":
    sys.exit(main())
