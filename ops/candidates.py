"""Which CUDA kernel candidate runs each DCNv3 call.

Each direction has several kernel designs ("candidates", ``ops/csrc/dcnv3_cuda_kernels.cuh``;
their expected bytes, atomics and occupancy in ``docs/benchmarks/ops/NOTES.md``), all computing the
same result. ``candidate_table.TABLE`` maps direction × dtype × shape class to one of them; it is
checked once at import, so a measurement (``python -m internimage.ops.bench --candidates all``)
changes one entry. ``INTERNIMAGE_DCNV3_CUDA_KERNELS`` overrides the table for experiments: one
name for both directions (``tiled``), or per direction (``forward=points_split,backward=split``).
"""
from __future__ import annotations

import os

import torch

from .candidate_table import TABLE as _SHIPPED_TABLE

FORWARD = ("untiled", "tiled", "points_split")
BACKWARD = ("untiled", "tiled", "chunk4", "split")
CANDIDATES = {"forward": FORWARD, "backward": BACKWARD}
DTYPES = ("float16", "bfloat16", "float32", "float64")
SHAPE_CLASSES = ("large", "medium", "small")
OVERRIDE_ENV = "INTERNIMAGE_DCNV3_CUDA_KERNELS"


def shape_class(height_out: int, width_out: int) -> str:
    """By output pixels per image: "large" above 32² (InternImage's 56² stage 1 at 224²), "medium"
    above 16² (28²), else "small" (14², 7²: launch- and latency-bound)."""
    pixels = height_out * width_out
    return "large" if pixels > 32 * 32 else "medium" if pixels > 16 * 16 else "small"


def checked_table(table: dict) -> dict:
    """``table`` ({direction: {dtype: {shape class: candidate}}}) when every entry is present and
    names a candidate of its direction; else ValueError naming the entry."""
    for direction, names in CANDIDATES.items():
        for dtype in DTYPES:
            for klass in SHAPE_CLASSES:
                name = table.get(direction, {}).get(dtype, {}).get(klass)
                if name not in names:
                    raise ValueError(f"candidate table: {direction}/{dtype}/{klass} is {name!r}, not one of {names}")
    return table


TABLE = checked_table(_SHIPPED_TABLE)


def parse_override(text: str) -> dict[str, str]:
    """``INTERNIMAGE_DCNV3_CUDA_KERNELS`` → {direction: candidate}; a bare name sets every direction
    that has it."""
    choice: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        direction, _, name = part.rpartition("=")
        directions = [direction] if direction else [d for d, names in CANDIDATES.items() if name in names]
        if not directions or any(d not in CANDIDATES or name not in CANDIDATES[d] for d in directions):
            raise ValueError(f"{OVERRIDE_ENV}={text!r}: {part!r} is not a candidate; forward: {FORWARD}, "
                             f"backward: {BACKWARD} (e.g. 'tiled' or 'forward=points_split,backward=split')")
        choice.update(dict.fromkeys(directions, name))
    return choice


def choose(direction: str, dtype: torch.dtype, height_out: int, width_out: int) -> str:
    """The candidate for one call: the override where it names this direction, else the table."""
    override = os.environ.get(OVERRIDE_ENV, "")
    if override:
        picked = parse_override(override).get(direction)
        if picked is not None:
            return picked
    dtype_name = str(dtype).removeprefix("torch.")
    return TABLE[direction][dtype_name][shape_class(height_out, width_out)]
