"""Stage-wise fine-tuning at rising resolution: ``python -m internimage.pretrain.finetune [CONFIG] [key=value ...]``.

Started once per rank by the ``deepspeed`` launcher (``launch/finetune.sh``). A fine-tuning config
is a pretraining config (every section of ``PretrainConfig``, supervised objective) plus ``init``
(where the weights come from) and ``stages`` (what changes from stage to stage). Each stage is one
run of the pretraining engine in ``RUN_DIR/<i>-<name>``, started from ``init.pth`` in that folder:
the prepared starting weights (stage 0) or the previous stage's final weights (EMA or raw).

Resume: a stage folder with ``stage_result.json`` is finished and skipped; any other stage resumes
from its own latest checkpoint (the engine's ``checkpoint.resume=auto``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from internimage.data import SourceConfig
from internimage.model import create_model, extract_state_dict

from .config import ConfigError, PretrainConfig, config_tree
from .configio import from_dict
from .engine import free_memory, release_engine
from .export import export_weights
from .distributed import PREEMPTION, barrier, rank as this_rank, world_size
from .train import Trainer, run_entry

__all__ = ["FinetuneConfig", "InitConfig", "StageConfig", "load_finetune_config", "prepare_stage_weights",
           "stage_config", "main"]

RESULT_FILE = "stage_result.json"
INIT_FILE = "init.pth"


@dataclass
class InitConfig:
    """Where stage 0's weights come from and how the classifier is set up for the target classes."""
    # A pretraining run folder (its latest ZeRO-3 checkpoint is consolidated), an exported .pth,
    # or an official InternImage checkpoint (weights under model/module/state_dict, "student." ok).
    source: Optional[str] = None
    ema: bool = True  # from a run folder: its EMA weights when it kept them
    head_init_std: float = 1e-3  # a new head starts small so it does not disturb the features


@dataclass
class StageConfig:
    """One fine-tuning stage; unset (null) fields keep the value of the shared sections."""
    name: str
    img_size: int
    # Data and classes, when a stage moves to another dataset (e.g. ImageNet-22K → 1K).
    train_sources: Optional[list[SourceConfig]] = None
    val_shards: Optional[str] = None
    epoch_samples: Optional[int] = None
    num_classes: Optional[int] = None
    # A file with one class index per line (or a JSON list): rows of the starting head to keep,
    # e.g. the 1000 ImageNet-1K classes of a 21841-class head. Else a head of another size is new.
    class_indices: Optional[str] = None
    epochs: Optional[float] = None
    total_steps: Optional[int] = None
    warmup_epochs: Optional[float] = None
    lr: Optional[float] = None
    min_lr: Optional[float] = None
    layer_decay: Optional[float] = None
    batch_size: Optional[int] = None  # micro-batch per rank
    global_batch: Optional[int] = None  # kept by accumulation: batch_size · world · grad_accum
    grad_accum: Optional[int] = None
    drop_path_rate: Optional[float] = None
    label_smoothing: Optional[float] = None
    mixup: Optional[float] = None
    cutmix: Optional[float] = None
    ema: Optional[bool] = None
    ema_decay: Optional[float] = None
    next_from_ema: bool = True  # the next stage starts from this stage's EMA weights (when kept)


@dataclass
class FinetuneConfig(PretrainConfig):
    run_dir: str = "runs/finetune"
    init: InitConfig = field(default_factory=InitConfig)
    stages: list[StageConfig] = field(default_factory=list)

    def validate(self, world_size: int | None = None) -> "FinetuneConfig":
        """Everything ``stage_config`` needs, checked before any work; ConfigError names the fix."""
        super().validate()
        if self.objective.kind != "supervised":
            raise ConfigError("fine-tuning trains classifiers: objective.kind must be 'supervised'.")
        if not self.stages:
            raise ConfigError("stages is empty: list at least one stage with a name and an img_size.")
        if not self.init.source:
            raise ConfigError("init.source is missing: give a pretraining run folder, an exported .pth "
                              "or an official checkpoint.")
        for stage in self.stages:
            if stage.class_indices is not None and not os.path.isfile(stage.class_indices):
                raise ConfigError(f"stage {stage.name}: class_indices file {stage.class_indices} does not exist.")
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be unique, got {names}.")
        for index in range(len(self.stages)):
            stage_config(self, index, world_size or 1)
        return self


def load_finetune_config(path: Optional[str], overrides: list[str] = (),
                         world_size: int | None = None) -> FinetuneConfig:
    """YAML (with an optional ``base:`` pretraining config it builds on) + ``key.sub=value`` overrides
    (``stages.1.lr=1e-5`` reaches into the list) → validated config, before any work starts."""
    tree = config_tree(path, overrides, FinetuneConfig)
    for index, stage in enumerate(tree.get("stages") or []):
        missing = [key for key in ("name", "img_size") if not isinstance(stage, dict) or key not in stage]
        if missing:
            raise ConfigError(f"stages[{index}] lacks {', '.join(missing)}: every stage needs a name and "
                              "an img_size.")
    return from_dict(FinetuneConfig, tree).validate(world_size)


def _grad_accum(stage: StageConfig, batch_size: int, base_accum: int, world_size: int, where: str) -> int:
    if stage.global_batch is None:
        return stage.grad_accum or base_accum
    per_step = batch_size * world_size
    if stage.global_batch % per_step:
        raise ConfigError(f"{where}: global_batch {stage.global_batch} is not divisible by batch_size "
                          f"{batch_size} × {world_size} ranks; pick a micro-batch that divides it.")
    accum = stage.global_batch // per_step
    if stage.grad_accum is not None and stage.grad_accum != accum:
        raise ConfigError(f"{where}: grad_accum {stage.grad_accum} contradicts global_batch "
                          f"{stage.global_batch} = {batch_size} × {world_size} × {accum}; set one of them.")
    return accum


def stage_config(cfg: FinetuneConfig, index: int, world_size: int) -> PretrainConfig:
    """The pretraining-engine config of stage ``index``: shared sections with the stage's changes."""
    stage = cfg.stages[index]
    where = f"stages[{index}] ({stage.name})"
    shared = {f.name: copy.deepcopy(getattr(cfg, f.name)) for f in dataclasses.fields(PretrainConfig)}
    out = PretrainConfig(**shared)
    out.run_dir = os.path.join(cfg.run_dir, f"{index}-{stage.name}")
    out.model.pretrained = os.path.join(out.run_dir, INIT_FILE)
    out.checkpoint.resume = "auto"
    if stage.img_size < 1:
        raise ConfigError(f"{where}: img_size must be positive, got {stage.img_size}.")
    out.data.img_size = stage.img_size
    if stage.batch_size is not None:
        out.data.batch_size = stage.batch_size
    out.optim.grad_accum = _grad_accum(stage, out.data.batch_size, cfg.optim.grad_accum, world_size, where)
    if stage.total_steps is not None:
        out.schedule.total_steps = stage.total_steps
    elif stage.epochs is not None:
        out.schedule.epochs, out.schedule.total_steps = stage.epochs, None
    if stage.warmup_epochs is not None:
        out.schedule.warmup_steps = None  # the stage's warm-up in epochs wins over shared steps
    replacements = [(out.data, "train_sources", stage.train_sources), (out.data, "val_shards", stage.val_shards),
                    (out.data, "epoch_samples", stage.epoch_samples), (out.model, "num_classes", stage.num_classes),
                    (out.schedule, "warmup_epochs", stage.warmup_epochs), (out.optim, "lr", stage.lr),
                    (out.optim, "min_lr", stage.min_lr), (out.optim, "layer_decay", stage.layer_decay),
                    (out.model, "drop_path_rate", stage.drop_path_rate),
                    (out.data, "label_smoothing", stage.label_smoothing), (out.data, "mixup", stage.mixup),
                    (out.data, "cutmix", stage.cutmix), (out.ema, "enabled", stage.ema),
                    (out.ema, "decay", stage.ema_decay)]
    for section, name, value in replacements:
        if value is not None:
            setattr(section, name, value)
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
    from .checkpoint import resolve_resume
    point = resolve_resume(run_dir, run_dir)
    return bool(point is not None and point.state.get("ema"))


def _fit_classifier(state: dict[str, torch.Tensor], head: nn.Linear, class_indices: str | None,
                    init_std: float) -> None:
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
    weight = torch.empty(head.weight.shape)
    nn.init.trunc_normal_(weight, std=init_std, a=-2 * init_std, b=2 * init_std)
    state["head.weight"], state["head.bias"] = weight, torch.zeros(head.weight.shape[0])


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
        use_ema = cfg.stages[index - 1].next_from_ema and previous.ema.enabled
        state = export_weights(previous.run_dir, scratch, ema=use_ema)["model"]
        source = f"{previous.run_dir} ({'EMA' if use_ema else 'raw'} weights)"
    with torch.device("meta"):
        model = create_model(stage_cfg.model.name, num_classes=stage_cfg.model.num_classes, **stage_cfg.model.arch)
    _fit_classifier(state, model.head, cfg.stages[index].class_indices, cfg.init.head_init_std)
    _save({"model": state, "source": source}, out_path)
    if os.path.exists(scratch):
        os.remove(scratch)
    return out_path


def _save(payload: dict, path: str) -> None:
    torch.save(payload, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


# -- the stages --------------------------------------------------------------------------------
def _stage_result(stage: StageConfig, stage_cfg: PretrainConfig) -> dict:
    """Final evaluation and mean training throughput of a stage, read from its metrics."""
    evals, speeds = {}, []
    with open(os.path.join(stage_cfg.run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record["kind"] == "eval":
                evals = record
            elif "images_per_s" in record:
                speeds.append(record["images_per_s"])
    return {"stage": stage.name, "img_size": stage.img_size, "step": evals.get("step"),
            **{k: evals.get(k) for k in ("top1", "top5", "ema_top1", "ema_top5")},
            "images_per_s": sum(speeds) / len(speeds) if speeds else None}


def _run_stage(cfg: FinetuneConfig, index: int, world: int, rank: int) -> dict | None:
    """Runs stage ``index`` (resuming inside it if it was interrupted); None when preempted."""
    stage, stage_cfg = cfg.stages[index], stage_config(cfg, index, world)
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
        with open(f"{result_path}.tmp", "w") as f:
            json.dump(_stage_result(stage, stage_cfg), f, indent=1)
        os.replace(f"{result_path}.tmp", result_path)
    barrier()
    with open(result_path) as f:
        return json.load(f)


def format_summary(results: list[dict]) -> str:
    def pct(value):
        return f"{100 * value:6.2f}" if value is not None else "     -"

    lines = [f"{'stage':<16}{'res':>5}{'top-1':>8}{'top-5':>8}{'EMA top-1':>11}{'EMA top-5':>11}{'img/s':>9}"]
    for r in results:
        speed = f"{r['images_per_s']:9.1f}" if r.get("images_per_s") is not None else "        -"
        lines.append(f"{r['stage']:<16}{r['img_size']:>5}{pct(r['top1']):>8}{pct(r['top5']):>8}"
                     f"{pct(r['ema_top1']):>11}{pct(r['ema_top5']):>11}{speed}")
    return "\n".join(lines)


def run_finetune(cfg: FinetuneConfig) -> int:
    rank, world = this_rank(), world_size()
    PREEMPTION.install()
    results = []
    for index in range(len(cfg.stages)):
        result = None if PREEMPTION.agreed() else _run_stage(cfg, index, world, rank)
        if result is None:
            if rank == 0:
                print(f"stopped inside stage {cfg.stages[index].name}; the same command resumes it", flush=True)
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


def _make_run_dir_and_finetune(cfg: FinetuneConfig) -> int:
    if this_rank() == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
    return run_finetune(cfg)


def main(argv: list[str] | None = None) -> int:
    def load(path, overrides):
        return load_finetune_config(path, overrides, int(os.environ.get("WORLD_SIZE", "1")))
    return run_entry(argv, load, _make_run_dir_and_finetune)


if __name__ == "__main__":
    sys.exit(main())
