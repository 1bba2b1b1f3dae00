"""Shared helpers for the model tests: reduced-depth copies of every variant and the reference files."""
from __future__ import annotations

import ast
import os
import re
from pathlib import Path


# Key names and shapes of the official checkpoints (a copy of shared/reference/, kept with the tests
# so they never skip for want of it).
REFERENCE_DIR = Path(os.environ.get("INTERNIMAGE_REFERENCE_DIR", Path(__file__).resolve().parent / "official_keys"))

PARAMETERS = {  # docs/model.md §1, exact, 1000 classes
    "internimage_t": 29_918_424, "internimage_s": 50_079_880, "internimage_b": 97_461_832,
    "internimage_l": 223_334_810, "internimage_xl": 334_819_780, "internimage_h": 1_089_636_760,
    "internimage_g": 3_076_373_352,
}
ALL_VARIANTS = list(PARAMETERS)


def reduced_overrides(name: str) -> dict:
    """Depth cut to a few blocks, every other feature of the variant kept (level-2 norms included)."""
    if name in ("internimage_h", "internimage_g"):
        return {"depths": (1, 1, 3, 1), "level2_post_norm_block_ids": (0, 2)}
    return {"depths": (1, 1, 2, 1)}


def reference_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Official key → shape, from official_keys/state_dict_<variant>.txt."""
    path = REFERENCE_DIR / f"state_dict_{name}.txt"
    shapes = {}
    for line in path.read_text().splitlines():
        key, shape = line.split(" ", 1)
        shapes[key] = tuple(ast.literal_eval(shape))
    return shapes


_BLOCK = re.compile(r"^levels\.(\d+)\.blocks\.(\d+)\.")
_POST_NORM = re.compile(r"^levels\.2\.post_norms\.(\d+)\.")


def reduced_reference_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """The official keys that a ``reduced_overrides`` copy keeps, with their official shapes."""
    overrides = reduced_overrides(name)
    depths, extra_norms = overrides["depths"], len(overrides.get("level2_post_norm_block_ids", ()))
    kept = {}
    for key, shape in reference_shapes(name).items():
        block, post_norm = _BLOCK.match(key), _POST_NORM.match(key)
        if block and int(block[2]) >= depths[int(block[1])]:
            continue
        if post_norm and int(post_norm[1]) >= extra_norms:
            continue
        kept[key] = shape
    return kept
