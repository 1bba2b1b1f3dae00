"""Stage-wise fine-tuning at rising resolution: the stages of one job, run one after the other.

A fine-tuning config is a pretraining config (every section of ``PretrainConfig``, supervised
objective) plus ``init`` (where the weights come from) and ``stages``. A stage is a name, a few keys
of its own (``global_batch``, ``class_indices``, ``next_from_ema``) and a *partial config tree*:
any sections of the pretraining config with the values that change in that stage, merged onto the
shared ones exactly as a ``base:`` file is (``data: {img_size: 384}, optim: {lr: 2e-5}``). Each
stage is one run of the ``Trainer`` in ``RUN_DIR/<i>-<name>``, started from ``init.pth`` in that
folder: the prepared starting weights (stage 0) or the previous stage's final weights (EMA or raw).

Resume: a stage folder with ``stage_result.json`` is finished and skipped; any other stage resumes
from its own latest checkpoint (the engine's ``checkpoint.resume=auto``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from internimage.model import create_model, extract_state_dict, new_classifier

from .checkpoint import export_weights, resolve_resume
from .config import ConfigError, PretrainConfig, config_tree
from .configio import closest_key_hint, from_dict, merge_trees, to_dict
from .distributed import PREEMPTION, barrier, rank as this_rank, world_size
from .engine import free_memory, release_engine
from .evaluation import CONTRASTIVE_METRICS
from .files import atomic_torch_save, atomic_write_json, clear_preemption, record_preemption
from .trainer import Trainer

__all__ = ["FinetuneConfig", "InitConfig", "Stage", "load_finetune_config", "prepare_stage_weights",
           "make_run_dir_and_finetune", "run_finetune", "stage_config"]

RESULT_FILE = "stage_result.json"
INIT_FILE = "init.pth"


@dataclass
class InitConfig:
    """Where stage 0's weights come from."""
    # A pretraining run folder (its latest ZeRO-3 checkpoint is consolidated), an exported .pth,
    # or an official InternImage checkpoint (weights under model/module/state_dict, "student." ok).
    source: Optional[str] = None
    ema: bool = True  # from a run folder: its EMA weights when it kept them


@dataclass
class Stage:
    """One fine-tuning stage: its own keys plus ``changes``, a partial pretraining-config tree."""
    name: str
    # Kept by gradient accumulation: data.batch_size · world size · optim.grad_accum.
    global_batch: Optional[int] = None
    # A file with one class index per line (or a JSON list): rows of the starting head to keep,
    # e.g. the 1000 ImageNet-1K classes of a 21841-class head. Else a head of another size is new.
    class_indices: Optional[str] = None
    next_from_ema: bool = True  # the next stage starts from this stage's EMA weights (when kept)
    changes: dict = field(default_factory=dict)

    OWN_KEYS = ("name", "global_batch", "class_indices", "next_from_ema")

    @classmethod
    def from_tree(cls, tree: Any, index: int) -> "Stage":
        """``stages[index]`` of the YAML: own keys typed, every other key a config section."""
        where = f"stages.{index}"
        if not isinstance(tree, dict):
            raise ConfigError(f"{where}: expected a mapping with a name and config sections, got {tree!r}.")
        sections = [f.name for f in dataclasses.fields(PretrainConfig)]
        for key in tree:
            if key not in cls.OWN_KEYS and key not in sections:
                hint = _section_hint(str(key), where) or closest_key_hint(str(key), [*cls.OWN_KEYS, *sections])
                raise ConfigError(f"Unknown config key '{where}.{key}'.{hint}")
        if "name" not in tree:
            raise ConfigError(f"stages[{index}] lacks a name: every stage needs a name and data.img_size.")
        if "img_size" not in (tree.get("data") or {}):
            raise ConfigError(f"stages[{index}] lacks data.img_size: every stage needs a name and "
                              "data.img_size.")
        stage = from_dict(cls, {k: v for k, v in tree.items() if k in cls.OWN_KEYS}, where)
        stage.changes = {k: v for k, v in tree.items() if k not in cls.OWN_KEYS}
        return stage


def _section_hint(key: str, where: str) -> str:
    """For a section's key given at the top of a stage: where it belongs."""
    for section in dataclasses.fields(PretrainConfig):
        if dataclasses.is_dataclass(section.default_factory) and \
                key in {f.name for f in dataclasses.fields(section.default_factory)}:
            return f" Stages change config sections: write {where}.{section.name}.{key}."
    return ""


@dataclass
class FinetuneConfig(PretrainConfig):
    run_dir: str = "runs/finetune"
    init: InitConfig = field(default_factory=InitConfig)
    stages: list[dict] = field(default_factory=list)  # each a ``Stage`` tree (``stage(i)``)

    def stage(self, index: int) -> Stage:
        return Stage.from_tree(self.stages[index], index)

    def shared(self) -> dict:
        """The pretraining-config tree the stages are merged onto."""
        return {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(PretrainConfig)}

    def validate(self, world_size: int | None = None) -> "FinetuneConfig":
        """Everything ``stage_config`` needs, checked before any work; ConfigError names the fix."""
        super().validate()
        if self.objective.kind != "supervised":
            raise ConfigError("fine-tuning trains classifiers: objective.kind must be 'supervised'.")
        if not self.stages:
            raise ConfigError("stages is empty: list at least one stage with a name and data.img_size.")
        if not self.init.source:
            raise ConfigError("init.source is missing: give a pretraining run folder, an exported .pth "
                              "or an official checkpoint.")
        stages = [self.stage(i) for i in range(len(self.stages))]
        for stage in stages:
            if stage.class_indices is not None and not os.path.isfile(stage.class_indices):
                raise ConfigError(f"stage {stage.name}: class_indices file {stage.class_indices} does not exist.")
        names = [stage.name for stage in stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be unique, got {names}.")
        for index in range(len(stages)):
            stage_config(self, index, world_size or 1)
        return self


def load_finetune_config(path: Optional[str], overrides: list[str] = (),
                         world_size: int | None = None) -> FinetuneConfig:
    """YAML (with an optional ``base:`` pretraining config it builds on) + ``key.sub=value`` overrides
    (``stages.1.optim.lr=1e-5`` reaches into a stage) → validated config, before any work starts."""
    tree = config_tree(path, overrides, FinetuneConfig)
    return from_dict(FinetuneConfig, tree).validate(world_size)


def _grad_accum(stage: Stage, batch_size: int, base_accum: int, world_size: int, where: str) -> int:
    if stage.global_batch is None:
        return base_accum
    per_step = batch_size * world_size
    if stage.global_batch % per_step:
        raise ConfigError(f"{where}: global_batch {stage.global_batch} is not divisible by batch_size "
                          f"{batch_size} × {world_size} ranks; pick a micro-batch that divides it.")
    accum = stage.global_batch // per_step
    if "grad_accum" in (stage.changes.get("optim") or {}) and base_accum != accum:
        raise ConfigError(f"{where}: optim.grad_accum {base_accum} contradicts global_batch "
                          f"{stage.global_batch} = {batch_size} × {world_size} × {accum}; set one of them.")
    return accum


def _stage_tree(cfg: FinetuneConfig, stage: Stage) -> dict:
    """The shared tree with the stage's changes merged in. A length or warm-up the stage gives in
    epochs replaces shared ones given in steps (steps win over epochs within one tree)."""
    tree = merge_trees(cfg.shared(), stage.changes)
    changed = stage.changes.get("schedule") or {}
    if "epochs" in changed and "total_steps" not in changed:
        tree["schedule"]["total_steps"] = None
    if "warmup_epochs" in changed and "warmup_steps" not in changed:
        tree["schedule"]["warmup_steps"] = None
    return tree


def stage_config(cfg: FinetuneConfig, index: int, world_size: int) -> PretrainConfig:
    """The pretraining-engine config of stage ``index``: shared sections with the stage's changes."""
    stage = cfg.stage(index)
    where = f"stages[{index}] ({stage.name})"
    out = from_dict(PretrainConfig, _stage_tree(cfg, stage), f"stages.{index}")
    out.run_dir = os.path.join(cfg.run_dir, f"{index}-{stage.name}")
    out.model.pretrained = os.path.join(out.run_dir, INIT_FILE)
    out.checkpoint.resume = "auto"
    out.optim.grad_accum = _grad_accum(stage, out.data.batch_size, out.optim.grad_accum, world_size, where)
    try:
        return out.validate()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


# -- starting weights --------------------------------------------------------------------------
def _read_class_indices(path: str) -> list[int]:
    with open(path) as f:
        text = f.read()
    try:
        values = json.loads(text) if text.lstrip().startswith("[") else [int(v) for v in text.split()]
    except ValueError as exc:
        raise ConfigError(f"class_indices {path}: expected integers (one per line or a JSON list)") from exc
    return [int(v) for v in values]


def _source_state(init: InitConfig, scratch: str) -> dict[str, torch.Tensor]:
    """The image-model weights of ``init.source`` with bare official key names."""
    if os.path.isdir(init.source):
        return export_weights(init.source, scratch, ema=init.ema and _run_kept_ema(init.source))["model"]
    if not os.path.isfile(init.source):
        raise ConfigError(f"init.source {init.source} is neither a run folder nor a file.")
    return extract_state_dict(torch.load(init.source, map_location="cpu", weights_only=True))


def _run_kept_ema(run_dir: str) -> bool:
    point = resolve_resume(run_dir, run_dir)
    return bool(point is not None and point.state.ema)


def _fit_classifier(state: dict[str, torch.Tensor], head: nn.Linear, class_indices: str | None) -> None:
    """Makes ``state``'s head match ``head``: remapped rows, the source's own, or a new small one.

    Only the final Linear changes; the rest of the head (conv head, clip projector) is kept.
    """
    has_head = "head.weight" in state and "head.bias" in state
    if class_indices is not None:
        if not has_head:
            raise ConfigError("class_indices given, but the starting weights have no classifier head.")
        rows = torch.tensor(_read_class_indices(class_indices))
        if rows.numel() and (rows.min() < 0 or rows.max() >= state["head.weight"].shape[0]):
            raise ConfigError(f"class_indices {class_indices} must lie in 0..{state['head.weight'].shape[0] - 1}.")
        state["head.weight"], state["head.bias"] = state["head.weight"][rows], state["head.bias"][rows]
    if has_head and state["head.weight"].shape == head.weight.shape:
        return
    new = new_classifier(head.in_features, head.out_features)
    state["head.weight"], state["head.bias"] = new.weight.detach(), new.bias.detach()


def prepare_stage_weights(cfg: FinetuneConfig, index: int, stage_cfg: PretrainConfig, world: int) -> str:
    """Writes ``init.pth`` of stage ``index``: the init source (stage 0) or the previous stage's
    final weights, with the classifier fitted to this stage's classes. Returns its path."""
    out_path = os.path.join(stage_cfg.run_dir, INIT_FILE)
    scratch = f"{out_path}.export"  # init.pth itself appears only once its head is fitted
    os.makedirs(stage_cfg.run_dir, exist_ok=True)
    if index == 0:
        state, source = _source_state(cfg.init, scratch), cfg.init.source
    else:
        previous = stage_config(cfg, index - 1, world)
        use_ema = cfg.stage(index - 1).next_from_ema and previous.ema.enabled
        state = export_weights(previous.run_dir, scratch, ema=use_ema)["model"]
        source = f"{previous.run_dir} ({'EMA' if use_ema else 'raw'} weights)"
    with torch.device("meta"):
        model = create_model(stage_cfg.model.name, num_classes=stage_cfg.model.num_classes, **stage_cfg.model.arch)
    _fit_classifier(state, model.head, cfg.stage(index).class_indices)
    atomic_torch_save({"model": state, "source": source}, out_path)
    if os.path.exists(scratch):
        os.remove(scratch)
    return out_path


# -- the stages --------------------------------------------------------------------------------
def _stage_result(stage: Stage, stage_cfg: PretrainConfig) -> dict:
    """Final evaluation and mean training throughput of a stage, read from its metrics."""
    evals, speeds = {}, []
    with open(os.path.join(stage_cfg.run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record["kind"] == "eval":
                evals = record
            elif "images_per_s" in record:
                speeds.append(record["images_per_s"])
    contrastive = [f"{weights}{name}" for weights in ("", "ema_") for name in CONTRASTIVE_METRICS]
    return {"stage": stage.name, "img_size": stage_cfg.data.img_size, "step": evals.get("step"),
            **{k: evals.get(k) for k in ("top1", "top5", "ema_top1", "ema_top5")},
            **{k: evals[k] for k in contrastive if k in evals},
            "images_per_s": sum(speeds) / len(speeds) if speeds else None}


def _run_stage(cfg: FinetuneConfig, index: int, world: int, rank: int) -> dict | None:
    """Runs stage ``index`` (resuming inside it if it was interrupted); None when preempted."""
    stage, stage_cfg = cfg.stage(index), stage_config(cfg, index, world)
    result_path = os.path.join(stage_cfg.run_dir, RESULT_FILE)
    if os.path.isfile(result_path):
        with open(result_path) as f:
            return json.load(f)
    if rank == 0 and not os.path.isfile(os.path.join(stage_cfg.run_dir, INIT_FILE)):
        path = prepare_stage_weights(cfg, index, stage_cfg, world)
        print(f"stage {stage.name}: starting weights in {path}", flush=True)
    barrier()

    trainer = Trainer(stage_cfg)
    trainer.run()
    finished = trainer.progress.step >= trainer.total_steps
    release_engine(trainer.engine)  # the next stage's engine must not share the device with this one
    del trainer
    free_memory()
    if not finished:
        return None
    if rank == 0:
        atomic_write_json(result_path, _stage_result(stage, stage_cfg))
    barrier()
    with open(result_path) as f:
        return json.load(f)


def _pct(value) -> str:
    return f"{100 * value:6.2f}" if value is not None else "     -"


def format_summary(results: list[dict]) -> str:
    """The table of the stages; with the text tower's metrics (zero-shot, retrieval) a second one."""
    lines = [f"{'stage':<16}{'res':>5}{'top-1':>8}{'top-5':>8}{'EMA top-1':>11}{'EMA top-5':>11}{'img/s':>9}"]
    for r in results:
        speed = f"{r['images_per_s']:9.1f}" if r.get("images_per_s") is not None else "        -"
        lines.append(f"{r['stage']:<16}{r['img_size']:>5}{_pct(r['top1']):>8}{_pct(r['top5']):>8}"
                     f"{_pct(r['ema_top1']):>11}{_pct(r['ema_top5']):>11}{speed}")
    if any(name in r for r in results for name in CONTRASTIVE_METRICS):
        lines += ["", _contrastive_table(results)]
    return "\n".join(lines)


def _contrastive_table(results: list[dict]) -> str:
    """Zero-shot top-1/top-5 and retrieval R@1/5/10 per stage, raw and EMA weights (percent)."""
    heads = ("zero-shot top-1", "top-5", "i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10")
    lines = [f"{'stage':<16}{'weights':>8}" + "".join(f"{h:>{max(8, len(h) + 1)}}" for h in heads)]
    for r in results:
        for weights, prefix in (("raw", ""), ("EMA", "ema_")):
            values = [r.get(prefix + name) for name in CONTRASTIVE_METRICS]
            if any(v is not None for v in values):
                lines.append(f"{r['stage']:<16}{weights:>8}" + "".join(
                    f"{_pct(v):>{max(8, len(h) + 1)}}" for h, v in zip(heads, values)))
    return "\n".join(lines)


def run_finetune(cfg: FinetuneConfig) -> int:
    """Runs the stages in order, skipping finished ones; 0 when done or preempted."""
    rank, world = this_rank(), world_size()
    PREEMPTION.install()
    if rank == 0:
        clear_preemption(cfg.run_dir)
    results = []
    for index in range(len(cfg.stages)):
        result = None if PREEMPTION.agreed() else _run_stage(cfg, index, world, rank)
        if result is None:
            if rank == 0:
                record_preemption(cfg.run_dir, stage=cfg.stage(index).name)
                print(f"stopped inside stage {cfg.stage(index).name}; the same command resumes it", flush=True)
            return 0
        results.append(result)
    if rank == 0:
        table = format_summary(results)
        print("\nfine-tuning summary\n" + table, flush=True)
        with open(os.path.join(cfg.run_dir, "summary.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(cfg.run_dir, "summary.txt"), "w") as f:
            f.write(table + "\n")
    return 0


def make_run_dir_and_finetune(cfg: FinetuneConfig) -> int:
    if this_rank() == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
    return run_finetune(cfg)
