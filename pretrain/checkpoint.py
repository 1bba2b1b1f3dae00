"""Sharded checkpoints: save with an atomic ``latest``, keep the last K, find and load a resume point.

Layout of ``RUN_DIR/checkpoints/``::

    latest                      text: the tag of the newest *complete* checkpoint
    step_00000100/              DeepSpeed's sharded files (zero_pp_rank_*, *_optim_states.pt)
        trainer_state.json      step, samples, world size, counters, resolved config (rank 0)
        rank_00000.pt ...       per rank: data-loader state, RNG states, EMA shard
        COMPLETE                the completion marker: written last, once every rank wrote everything
    step_00000100_universal/    made on demand to resume at another world size (in the resuming
                                run's folder, whatever run it converts; marked COMPLETE once whole)

``latest`` is replaced (write + rename) only after a barrier that every rank reaches after
writing all its files, and after the ``COMPLETE`` marker, so a crash or kill mid-save leaves
``latest`` on the previous checkpoint. Should ``latest`` be lost (missing, empty, naming a missing
folder), ``resume=auto`` continues from the newest folder with the marker, with a warning, and never
starts from step 0 while one exists. A folder without the marker is a crash's leftover: it is
cleaned before its tag is written again and never counts towards ``keep_last``.
"""
from __future__ import annotations

import errno
import glob
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from .configio import ConfigError
from .distributed import barrier, broadcast_object, gather_objects, rank as this_rank
from .files import atomic_torch_save, atomic_write_json, atomic_write_text
from .module import IMAGE_PREFIX
from .state import RankState, RunState

__all__ = ["CheckpointWriteError", "ResumePoint", "checkpoint_root", "consolidated_weights", "ema_shards",
           "export_weights", "folder_bytes", "load_checkpoint", "prepare_universal", "resolve_resume",
           "save_checkpoint", "step_tag"]


TRAINER_STATE = "trainer_state.json"
COMPLETE = "COMPLETE"  # the completion marker, written last
FORMAT = 2  # in trainer_state.json; absent from checkpoints written before completion markers
_TAG = re.compile(r"^step_(\d+)$")


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def _rank_file(tag_dir: str, rank: int) -> str:
    return os.path.join(tag_dir, f"rank_{rank:05d}.pt")


def _has_marker(tag_dir: str) -> bool:
    return os.path.isfile(os.path.join(tag_dir, COMPLETE))


def _legacy_complete(tag_dir: str) -> bool:
    """A folder written before completion markers existed (no ``format`` in its trainer state) that
    holds its trainer state and every rank file."""
    try:
        with open(os.path.join(tag_dir, TRAINER_STATE)) as f:
            state = json.load(f)
        world = int(state["world_size"])
    except (OSError, ValueError, KeyError):
        return False
    if "format" in state:  # written by a save with markers, which never finished
        return False
    return all(os.path.isfile(_rank_file(tag_dir, r)) for r in range(world))


def _step_dirs(root: str) -> list[int]:
    """The steps of the ``step_N`` folders under ``root``, ascending."""
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for d in os.listdir(root)
                  if (m := _TAG.match(d)) and os.path.isdir(os.path.join(root, d)))


def _complete_steps(root: str) -> list[int]:
    """The steps of the complete checkpoints under ``root``, ascending: those with the completion
    marker, and those older than every marked one that hold all their files (written before markers
    existed). A crash's partial folder is newer than the last marked one, so it never counts."""
    steps = _step_dirs(root)
    marked = [s for s in steps if _has_marker(os.path.join(root, step_tag(s)))]
    first_marked = marked[0] if marked else float("inf")
    legacy = [s for s in steps if s < first_marked and _legacy_complete(os.path.join(root, step_tag(s)))]
    return sorted(legacy + marked)


def _is_complete(root: str, tag: str) -> bool:
    m = _TAG.match(tag)
    if not m:  # a folder named otherwise (copied, renamed): its own files decide
        return _has_marker(os.path.join(root, tag)) or _legacy_complete(os.path.join(root, tag))
    return int(m.group(1)) in _complete_steps(root)


def _fault_point(name: str, tag: str, path: str = "") -> None:
    """Fault injection for the save tests: ``INTERNIMAGE_FAULT=<name>:<tag>:<rank>`` makes that rank,
    at that point of saving that checkpoint, exit at once as a kill would (``save``), or fail to
    write ``path`` as a full disk would (``enospc``)."""
    spec = os.environ.get("INTERNIMAGE_FAULT", "")
    if not spec:
        return
    fault_name, fault_tag, fault_rank = (spec.split(":") + ["", ""])[:3]
    if fault_name == name and fault_tag in ("", tag) and fault_rank in ("", str(this_rank())):
        if name == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected)", path)
        os._exit(17)


class CheckpointWriteError(RuntimeError):
    """A rank could not write its part of a checkpoint (disk full, I/O error); every rank raises it."""


def _written(write) -> str | None:
    """Runs ``write``; the OSError it raised, as this rank's message, or None."""
    try:
        write()
        return None
    except OSError as exc:
        return f"rank {this_rank()}: {exc}"


def _agree_written(error: str | None, tag_dir: str, previous: str | None) -> None:
    """Every rank learns every rank's write error (collective); all raise when there is one."""
    errors = [e for e in gather_objects(error) if e]
    if errors:
        raise CheckpointWriteError(
            f"checkpoint {tag_dir} was not saved ({'; '.join(errors)}); latest still names "
            f"{previous or 'no checkpoint'}. Free space or fix the filesystem, then run the same command "
            "to resume.")


def save_checkpoint(engine: Any, root: str, run_state: RunState, rank_state: RankState,
                    keep_last: int) -> str:
    """Writes the checkpoint of ``run_state.step`` on every rank; returns its tag. Collective: all
    ranks call it. A write error on any rank (``OSError``: disk full...) leaves ``latest`` where it
    was and raises ``CheckpointWriteError`` on every rank, naming the path."""
    tag = step_tag(run_state.step)
    tag_dir = os.path.join(root, tag)
    rank = this_rank()
    previous = _read_latest(root)
    if rank == 0 and os.path.isdir(tag_dir):
        # A crash's partial folder, or this step saved before (a run resumed from an older step):
        # nothing of it may mix with this save, and its marker goes first, so a crash while it is
        # removed or rewritten never leaves a folder that claims to be complete.
        if _has_marker(tag_dir):
            os.remove(os.path.join(tag_dir, COMPLETE))
        shutil.rmtree(tag_dir)
    barrier()

    def write_parts() -> None:
        engine.save_checkpoint(root, tag=tag, save_latest=False)
        _fault_point("enospc", tag, _rank_file(tag_dir, rank))
        atomic_torch_save(rank_state.to_dict(), _rank_file(tag_dir, rank))
        if rank == 0:
            atomic_write_json(os.path.join(tag_dir, TRAINER_STATE), {**run_state.to_json(), "format": FORMAT})

    error = _written(write_parts)
    _fault_point("save", tag)
    _agree_written(error, tag_dir, previous)  # every rank has written everything: only now may latest move

    def complete() -> None:
        atomic_write_json(os.path.join(tag_dir, COMPLETE), {"step": run_state.step,
                                                            "world_size": run_state.world_size})
        atomic_write_text(os.path.join(root, "latest"), tag)
        _prune(root, keep_last, current=tag)

    _agree_written(_written(complete) if rank == 0 else None, tag_dir, previous)
    return tag


def folder_bytes(path: str) -> int:
    """Bytes of every file under ``path`` (a checkpoint: all ranks' shards)."""
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names)


def _prune(root: str, keep_last: int, current: str) -> None:
    """Keeps the newest ``keep_last`` complete checkpoints (and ``current``); removes the rest and
    every partial folder a crash left."""
    steps = _step_dirs(root)
    complete = _complete_steps(root)
    keep = {step_tag(s) for s in complete[-keep_last:]} | {current}
    for s in steps:
        if step_tag(s) not in keep:
            shutil.rmtree(os.path.join(root, step_tag(s)), ignore_errors=True)
    current_step = int(_TAG.match(current).group(1))
    for name in os.listdir(root):  # converted copies: needed only until this run saved its own
        m = re.match(r"^step_(\d+)_universal", name)
        if m and int(m.group(1)) < current_step:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


@dataclass
class ResumePoint:
    """A complete checkpoint to continue from."""
    root: str
    tag: str
    state: RunState  # its trainer_state.json

    @property
    def tag_dir(self) -> str:
        return os.path.join(self.root, self.tag)

    @property
    def world_size(self) -> int:
        return self.state.world_size


def _read_latest(root: str) -> str | None:
    path = os.path.join(root, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def _point(root: str, tag: str) -> ResumePoint:
    tag_dir = os.path.join(root, tag)
    state_path = os.path.join(tag_dir, TRAINER_STATE)
    if not os.path.isfile(state_path) or not _is_complete(root, tag):
        raise ConfigError(f"Checkpoint '{tag_dir}' is incomplete (no {COMPLETE} marker: a save was "
                          "cut short); pick another with resume=PATH.")
    with open(state_path) as f:
        return ResumePoint(root, tag, RunState.from_json(json.load(f)))


def _latest_point(root: str) -> ResumePoint | None:
    """What ``latest`` names when that is complete; else, with a warning, the newest complete
    checkpoint; None only when ``root`` holds no complete checkpoint."""
    tag = _read_latest(root)
    if tag and _is_complete(root, tag):
        return _point(root, tag)
    complete = _complete_steps(root)
    if not complete:
        return None
    found = step_tag(complete[-1])
    why = "is missing or empty" if not tag else f"names {tag!r}, which is missing or incomplete"
    print(f"warning: {os.path.join(root, 'latest')} {why}; resuming from the newest complete "
          f"checkpoint, {os.path.join(root, found)}", file=sys.stderr, flush=True)
    return _point(root, found)


def resolve_resume(resume: str | None, run_dir: str) -> ResumePoint | None:
    """``"auto"``: the run's ``latest`` if any; a path to a tag folder, a checkpoints folder or a run
    folder; None: start fresh."""
    if resume is None:
        return None
    if resume == "auto":
        return _latest_point(checkpoint_root(run_dir))
    path = os.path.abspath(resume)
    if os.path.isfile(os.path.join(path, TRAINER_STATE)):
        return _point(os.path.dirname(path), os.path.basename(path))
    for root in (path, checkpoint_root(path)):
        point = _latest_point(root)
        if point is not None:
            return point
    raise ConfigError(f"resume={resume!r} is neither a checkpoint folder (with {TRAINER_STATE}) nor a "
                      "folder with a 'latest' file; give a path such as RUN_DIR/checkpoints/step_00000100.")


def prepare_universal(point: ResumePoint, root: str, timeout_s: float) -> str:
    """Converts ``point`` with DeepSpeed's ``ds_to_universal`` (rank 0, once) into ``root``, the
    current run's checkpoints folder (the source run's pruning may delete anything put there);
    returns the converted folder. Collective.

    Atomic: the conversion goes to a temporary folder, which gets the completion marker and is
    then renamed; a folder without the marker (an interrupted conversion) is redone, never trusted.
    The other ranks wait for the marker on the shared folder for up to ``timeout_s`` (a conversion
    of InternImage-H takes far longer than a collective may wait)."""
    out = os.path.join(root, point.tag + "_universal")
    attempt = uuid.uuid4().hex
    needed, attempt = broadcast_object((_marker(out).get("source") != os.path.abspath(point.tag_dir), attempt))
    failed = f"{out}.failed.{attempt}"
    failure = None
    if needed and this_rank() == 0:
        failure = _convert_universal(point, out, attempt, timeout_s)
        if failure is not None:
            atomic_write_text(failed, failure)  # the other ranks stop waiting
    elif needed:
        deadline = time.monotonic() + timeout_s
        while not _marker_of(out, attempt) and not os.path.exists(failed):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"rank {this_rank()}: waited {timeout_s / 60:.0f} min for rank 0's universal conversion "
                    f"of {point.tag_dir} into {out}; raise checkpoint.universal_timeout_minutes.")
            time.sleep(2.0)
    failure = broadcast_object(failure)
    if failure is not None:
        if this_rank() == 0 and os.path.exists(failed):
            os.remove(failed)
        raise RuntimeError(failure)
    return out


def _marker(tag_dir: str) -> dict:
    """The completion marker's record ({} when there is none)."""
    try:
        with open(os.path.join(tag_dir, COMPLETE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _marker_of(out: str, attempt: str) -> bool:
    return _marker(out).get("attempt") == attempt


def _convert_universal(point: ResumePoint, out: str, attempt: str, timeout_s: float) -> str | None:
    """Rank 0's conversion into a temporary folder renamed to ``out``; the failure, or None."""
    shutil.rmtree(out, ignore_errors=True)  # an interrupted conversion: redone
    for leftover in glob.glob(glob.escape(out) + ".tmp.*"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = f"{out}.tmp.{os.getpid()}"
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               point.tag_dir, "--output_folder", tmp, "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return (f"ds_to_universal did not finish converting {point.tag_dir} within {timeout_s / 60:.0f} "
                "min; raise checkpoint.universal_timeout_minutes.")
    if result.returncode != 0:
        return f"ds_to_universal failed on {point.tag_dir}:\n{result.stderr[-4000:]}"
    atomic_write_json(os.path.join(tmp, COMPLETE), {"source": os.path.abspath(point.tag_dir),
                                                    "attempt": attempt})
    os.rename(tmp, out)
    stray = os.path.join(os.path.dirname(out), "latest_universal")  # ds_to_universal's, naming tmp
    if os.path.isfile(stray):
        os.remove(stray)
    return None


def load_checkpoint(engine: Any, point: ResumePoint, universal_dir: str | None = None) -> RankState:
    """Loads weights + optimizer into ``engine`` (from ``universal_dir``, its converted copy, when
    given); returns this rank's saved per-rank state (the state of rank ``min(rank, saved_world − 1)``
    when the world size changed)."""
    load_root, load_tag = os.path.split(universal_dir) if universal_dir else (point.root, point.tag)
    load_path, _ = engine.load_checkpoint(load_root, tag=load_tag,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {point.tag_dir}")
    if universal_dir is not None:
        _restore_buffers(engine.module, point)
    rank = this_rank()
    source_rank = min(rank, point.world_size - 1)
    return _read_rank_state(point, source_rank)


def _legacy_numpy_globals() -> list:
    """What a rank file of an older version needs besides tensors: numpy's RNG key array."""
    import numpy as np
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _read_rank_state(point: ResumePoint, rank: int) -> RankState:
    """A rank file, loaded with ``weights_only=True``: tensors and plain types only, never code
    (files of older versions also hold a numpy array, allowed by name)."""
    path = _rank_file(point.tag_dir, rank)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            with torch.serialization.safe_globals(_legacy_numpy_globals()):
                data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            lines = str(exc).splitlines()
            detail = next((line.strip() for line in lines if "Unsupported" in line), lines[0] if lines else "")
            raise RuntimeError(
                f"{path} holds objects other than tensors and plain types, which this version never "
                f"writes; refusing to load it (unpickling such a file can run code). "
                f"Resume from a checkpoint of a run you trust. ({detail})") from None
    return RankState.from_dict(data)


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


def ema_shards(point: ResumePoint) -> list[dict]:
    """The EMA shard of every rank of ``point``, in rank order (``ShardedEMA.state_dict()`` each)."""
    if not point.state.ema:
        raise ValueError(f"checkpoint {point.tag_dir} holds no EMA (the run had ema.enabled=false)")
    return [_read_rank_state(point, r).ema for r in range(point.world_size)]


def consolidated_weights(point: ResumePoint, ema: bool = False) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of the image model (official key names) at ``point``: DeepSpeed's
    own ``zero_to_fp32`` joins the ZeRO shards, or the per-rank EMA shards are joined."""
    if ema:
        from .ema import assemble_full_ema
        full, _ = assemble_full_ema(ema_shards(point))
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        full = get_fp32_state_dict_from_zero_checkpoint(point.root, tag=point.tag)
    image = {k[len(IMAGE_PREFIX):]: v.float() if v.is_floating_point() else v
             for k, v in full.items() if k.startswith(IMAGE_PREFIX)}
    if not image:
        raise ValueError(f"checkpoint {point.tag_dir} holds no image-model tensors (no keys under "
                         f"'{IMAGE_PREFIX}')")
    return image


def export_weights(source: str, out: str, ema: bool = False) -> dict:
    """Writes the image model of the newest checkpoint under ``source`` (a run folder, its
    checkpoints folder or one checkpoint folder) to ``out`` in the official format: ``{"model":
    state_dict, "step", "ema", "model_name", "num_classes", "arch"}``. Returns what it saved."""
    point = resolve_resume(source, source)
    if point is None:
        raise FileNotFoundError(f"no checkpoint under {source}")
    model_cfg = point.state.config["model"]
    payload = {"model": consolidated_weights(point, ema), "step": point.state.step, "ema": ema,
               "model_name": model_cfg["name"], "num_classes": model_cfg["num_classes"],
               "arch": model_cfg["arch"]}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_torch_save(payload, out)
    return payload
