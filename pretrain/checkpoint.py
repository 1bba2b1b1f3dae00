"""Sharded checkpoints: save with an atomic ``latest``, keep the last K, find and load a resume point.

Layout of ``RUN_DIR/checkpoints/``::

    latest                      text: the tag of the newest *complete* checkpoint
    step_00000100/              DeepSpeed's sharded files (zero_pp_rank_*, *_optim_states.pt)
        trainer_state.json      step, samples, world size, counters, resolved config (rank 0)
        rank_00000.pt ...       per rank: data-loader state, RNG states, EMA shard
    step_00000100_universal/    made on demand to resume at another world size

``latest`` is replaced (write + rename) only after a barrier that every rank reaches after
writing all its files, so a crash or kill mid-save leaves ``latest`` on the previous checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch

from .configio import ConfigError
from .distributed import barrier, rank as this_rank

__all__ = ["ResumePoint", "checkpoint_root", "load_checkpoint", "prepare_universal",
           "resolve_resume", "save_checkpoint", "step_tag"]

TRAINER_STATE = "trainer_state.json"
_TAG = re.compile(r"^step_(\d+)$")


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def _rank_file(tag_dir: str, rank: int) -> str:
    return os.path.join(tag_dir, f"rank_{rank:05d}.pt")


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fault_point(name: str, tag: str) -> None:
    """Fault injection for the crash-during-save test: ``INTERNIMAGE_FAULT=<name>:<tag>:<rank>``
    makes that rank exit at once, as a kill would, at that point of saving that checkpoint."""
    spec = os.environ.get("INTERNIMAGE_FAULT", "")
    if not spec:
        return
    fault_name, fault_tag, fault_rank = (spec.split(":") + ["", ""])[:3]
    if fault_name == name and fault_tag in ("", tag) and fault_rank in ("", str(this_rank())):
        os._exit(17)


def save_checkpoint(engine: Any, root: str, step: int, trainer_state: dict, rank_state: dict,
                    keep_last: int) -> str:
    """Writes checkpoint ``step`` on every rank; returns its tag. Collective: all ranks call it."""
    tag = step_tag(step)
    tag_dir = os.path.join(root, tag)
    rank = this_rank()
    engine.save_checkpoint(root, tag=tag, save_latest=False)
    tmp = _rank_file(tag_dir, rank) + ".tmp"
    torch.save(rank_state, tmp)
    os.replace(tmp, _rank_file(tag_dir, rank))
    if rank == 0:
        _atomic_write_text(os.path.join(tag_dir, TRAINER_STATE), json.dumps(trainer_state, indent=1))
    _fault_point("save", tag)
    barrier()  # every rank has written everything: only now may latest move
    if rank == 0:
        _atomic_write_text(os.path.join(root, "latest"), tag)
        _prune(root, keep_last, current=tag)
    barrier()
    return tag


def _prune(root: str, keep_last: int, current: str) -> None:
    steps = sorted(int(m.group(1)) for d in os.listdir(root) if (m := _TAG.match(d)))
    keep = {step_tag(s) for s in steps[-keep_last:]} | {current}
    for s in steps:
        if step_tag(s) not in keep:
            shutil.rmtree(os.path.join(root, step_tag(s)), ignore_errors=True)
            shutil.rmtree(os.path.join(root, step_tag(s) + "_universal"), ignore_errors=True)


@dataclass
class ResumePoint:
    """A complete checkpoint to continue from."""
    root: str
    tag: str
    state: dict  # its trainer_state.json

    @property
    def tag_dir(self) -> str:
        return os.path.join(self.root, self.tag)

    @property
    def world_size(self) -> int:
        return int(self.state["world_size"])


def _read_latest(root: str) -> str | None:
    path = os.path.join(root, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def _point(root: str, tag: str) -> ResumePoint:
    state_path = os.path.join(root, tag, TRAINER_STATE)
    if not os.path.isfile(state_path):
        raise ConfigError(f"Checkpoint '{os.path.join(root, tag)}' is incomplete (no {TRAINER_STATE}); "
                          "pick another with resume=PATH.")
    with open(state_path) as f:
        return ResumePoint(root, tag, json.load(f))


def resolve_resume(resume: str | None, run_dir: str) -> ResumePoint | None:
    """``"auto"``: the run's ``latest`` if any; a path to a tag folder, a checkpoints folder or a run
    folder; None: start fresh."""
    if resume is None:
        return None
    if resume == "auto":
        root = checkpoint_root(run_dir)
        tag = _read_latest(root)
        return _point(root, tag) if tag else None
    path = os.path.abspath(resume)
    if os.path.isfile(os.path.join(path, TRAINER_STATE)):
        return _point(os.path.dirname(path), os.path.basename(path))
    for root in (path, checkpoint_root(path)):
        tag = _read_latest(root)
        if tag:
            return _point(root, tag)
    raise ConfigError(f"resume={resume!r} is neither a checkpoint folder (with {TRAINER_STATE}) nor a "
                      "folder with a 'latest' file; give a path such as RUN_DIR/checkpoints/step_00000100.")


def prepare_universal(point: ResumePoint) -> str:
    """Converts ``point`` with DeepSpeed's ``ds_to_universal`` (rank 0, once); returns the new tag.
    Collective."""
    tag = point.tag + "_universal"
    out = os.path.join(point.root, tag)
    if this_rank() == 0 and not os.path.isdir(os.path.join(out, "zero")):
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                   point.tag_dir, "--output_folder", out, "--num_extract_workers", "1",
                   "--num_merge_workers", "1"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"ds_to_universal failed on {point.tag_dir}:\n{result.stderr[-4000:]}")
    barrier()
    return tag


def load_checkpoint(engine: Any, point: ResumePoint, universal_tag: str | None = None) -> dict:
    """Loads weights + optimizer into ``engine``; returns this rank's saved per-rank state (the
    state of rank ``min(rank, saved_world − 1)`` when the world size changed)."""
    load_path, _ = engine.load_checkpoint(point.root, tag=universal_tag or point.tag,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {point.tag_dir}")
    if universal_tag is not None:
        _restore_buffers(engine.module, point)
    rank = this_rank()
    source_rank = min(rank, point.world_size - 1)
    return torch.load(_rank_file(point.tag_dir, source_rank), map_location="cpu", weights_only=False)


def _restore_buffers(module: torch.nn.Module, point: ResumePoint) -> None:
    """Universal loading restores parameters and optimizer state but not buffers (BatchNorm
    statistics); they are replicated, so rank 0's model-states file of the original has them."""
    states = torch.load(os.path.join(point.tag_dir, "zero_pp_rank_0_mp_rank_00_model_states.pt"),
                        map_location="cpu", weights_only=False)
    saved = states["module"]
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in saved:
                buf.copy_(saved[name].to(buf.dtype))


def rank_files(point: ResumePoint) -> list[str]:
    """Per-rank state files of ``point`` in rank order."""
    return [_rank_file(point.tag_dir, r) for r in range(point.world_size)]
