"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

Every file a later run or another rank reads (``latest``, checkpoint state, exported weights, the
resolved config, a fine-tuning stage's result) goes through here: written to a temporary name in
the same folder, flushed to disk, then renamed over the target (``os.replace`` is atomic on POSIX).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, IO

import torch

__all__ = ["atomic_torch_save", "atomic_write_json", "atomic_write_text"]


def _atomic(path: str, write: Callable[[IO], None], mode: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    _atomic(path, lambda f: f.write(text), "w")


def atomic_write_json(path: str, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=1))


def atomic_torch_save(obj: Any, path: str) -> None:
    _atomic(path, lambda f: torch.save(obj, f), "wb")
