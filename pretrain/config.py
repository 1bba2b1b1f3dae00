"""The pretraining configuration: one typed dataclass per concern, loaded from YAML plus overrides.

``load_config(path, overrides)`` is the one entry: it reads the YAML, applies ``key.sub=value``
overrides, builds the dataclasses (unknown keys and wrong types rejected, closest key suggested)
and checks cross-field consistency, all before any process starts work.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

from internimage.data import DataConfig, load_class_names

from .configio import ConfigError, apply_override, from_dict, parse_override, read_yaml_tree, to_dict
from .files import atomic_write_text

__all__ = [
    "CheckpointConfig", "ConfigError", "DeepSpeedSection", "EmaConfig", "EvalConfig", "LoggingConfig",
    "ModelConfig", "ObjectiveConfig", "OptimConfig", "PretrainConfig", "ScheduleConfig",
    "TextConfig", "WandbConfig", "load_config", "save_config",
]


@dataclass
class ModelConfig:
    """Which InternImage to build (``internimage.model.create_model`` arguments)."""
    name: str = "internimage_t"
    num_classes: int = 21841
    pretrained: Optional[str] = None
    drop_path_rate: Optional[float] = None
    # Architecture keyword overrides for create_model, e.g. channels/depths/groups of a tiny demo.
    arch: dict = field(default_factory=dict)
    # Run DCNv3 through the pure-PyTorch reference instead of the fused kernel (for cross-checks).
    dcn_reference: bool = False
    # Regional torch.compile of the blocks (InternImage.compile_blocks) with this backend. Off until
    # a GPU run shows the gain (python -m internimage.pretrain.bench --compile both).
    compile: bool = False
    compile_backend: str = "inductor"
    # The image enters the stem in channels-last memory (InternImage.set_channels_last); off until
    # a GPU run shows the gain (bench --channels-last both). Values are unchanged.
    channels_last: bool = False


@dataclass
class ActivationCheckpointingConfig:
    """Recomputing activations in the backward instead of keeping them (memory for compute): not
    to be confused with saving checkpoints of the run (``checkpoint``)."""
    enabled: Union[bool, list[bool]] = False  # all four stages, or one flag per stage
    every_blocks: int = 1  # within an enabled stage, blocks 0, k, 2k… recompute


@dataclass
class TextConfig:
    """The small text transformer of the contrastive objective (``model/text_tower.py``)."""
    vocab_size: Optional[int] = None  # None: the tokenizer's vocabulary size
    width: int = 512
    layers: int = 12
    heads: int = 8


@dataclass
class ObjectiveConfig:
    """supervised: soft-target CE; contrastive: CLIP loss; mixed: each sample by its source kind."""
    kind: Literal["supervised", "contrastive", "mixed"] = "supervised"
    supervised_weight: float = 1.0
    contrastive_weight: float = 1.0
    embed_dim: int = 512
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    gather_features: bool = True  # contrast against the features of every rank, not just this one


@dataclass
class OptimConfig:
    """AdamW with docs/model.md §2 layer-wise LR decay and DCN multiplier; lr is per ``base_batch_size``."""
    lr: float = 1e-3
    base_batch_size: Optional[int] = 512  # lr scales linearly with global batch / this; None: as is
    min_lr: float = 1e-6
    warmup_lr: float = 1e-7
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    layer_decay: float = 1.0
    dcn_lr_mult: float = 1.0
    grad_clip: float = 5.0  # 0 disables
    grad_accum: int = 1


@dataclass
class ScheduleConfig:
    """Length of training and warm-up, in epochs (of ``data.epoch_samples``) or optimizer steps."""
    epochs: float = 1.0
    total_steps: Optional[int] = None  # overrides epochs when set
    warmup_epochs: float = 0.0
    warmup_steps: Optional[int] = None  # overrides warmup_epochs when set
    max_nonfinite_steps: int = 5  # this many non-finite losses in a row stop training


@dataclass
class EmaConfig:
    """Exponential moving average of fp32 weights, sharded like the ZeRO-3 partitions."""
    enabled: bool = False
    decay: float = 0.9999
    evaluate: bool = True  # also evaluate the EMA weights


# Our own prompt wording for zero-shot classification; "{}" stands for the class name.
DEFAULT_PROMPT_TEMPLATES = ["a photo of a {}.", "a picture of the {}.", "an image showing a {}.",
                            "a close-up photo of a {}.", "a blurry photo of the {}."]


@dataclass
class EvalConfig:
    """What evaluation measures (``pretrain/evaluation.py``): top-1/top-5 of the head on
    ``data.val_shards``; with the text tower, zero-shot top-1/top-5 there when ``class_names`` is
    set and image↔text retrieval R@1/5/10 on ``data.val_caption_shards``."""
    every_steps: int = 0  # 0: only at the end
    at_end: bool = True
    max_batches: Optional[int] = None  # per rank, on data.val_shards (retrieval reads all pairs)
    # Zero-shot class names: a shipped list (demo, imagenet1k, imagenet22k) or a text file with
    # line i = the name of class i (data/class_names.py); null: no zero-shot classification.
    class_names: Optional[str] = None
    # Each class's text embedding is the mean of its normalised embeddings under these prompts.
    prompt_templates: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPT_TEMPLATES))


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3
    resume: Optional[str] = "auto"  # "auto": latest in run_dir if any; a path; null: start fresh
    universal: bool = False  # resume a checkpoint written at another world size
    # How long the other ranks wait for rank 0's universal conversion (InternImage-H: long).
    universal_timeout_minutes: float = 240.0


@dataclass
class WandbConfig:
    """Weights & Biases: rank 0 sends the scalars of metrics.jsonl (``pip install wandb``). The run
    id is kept in RUN_DIR/wandb_run.json, so a resumed run continues the same W&B run."""
    enabled: bool = False
    project: str = "internimage"
    entity: Optional[str] = None
    name: Optional[str] = None  # None: the run folder's name
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    # online, offline (kept under RUN_DIR/wandb, `wandb sync` later) or disabled; None: WANDB_MODE or online
    mode: Optional[Literal["online", "offline", "disabled"]] = None


@dataclass
class LoggingConfig:
    every_steps: int = 10
    tensorboard: bool = True
    progress_bar: bool = True
    peak_tflops: Optional[float] = None  # per device; None: looked up from the device table
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class DeepSpeedSection:
    """What goes into the DeepSpeed config (``extra`` merged in last for anything else), and how the
    ranks compute and communicate around it (TF32, collective timeout)."""
    zero_stage: Literal[0, 1, 2, 3] = 3
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    fp16_initial_scale_power: int = 16
    fp16_loss_scale_window: int = 1000
    overlap_comm: bool = True
    stage3_prefetch_bucket_size: Optional[int] = None
    stage3_param_persistence_threshold: Optional[int] = None
    # ZeRO-3 gathers each InternImage block's parameters at once when the block starts (DeepSpeed's
    # leaf modules) instead of layer by layer: fewer, larger all-gathers and far fewer hooks.
    # model.compile needs it under ZeRO-3 and implies it. Off until a GPU run shows the gain
    # (bench --whole-blocks both).
    gather_whole_blocks: bool = False
    # fp32 matmuls and convolutions on GPU tensor cores in TF32 (10-bit mantissa); bf16/fp16 and the
    # CPU are unaffected. On, as before this switch existed; bench --tf32 both times it.
    tf32: bool = True
    # Dtype of the gradient reduction across ranks. bf16 halves the traffic but rounds the partial
    # sums to an 8-bit mantissa at every hop of the ring (a thousand hops on a thousand GPUs);
    # fp32 keeps the sum exact to fp32 rounding. DeepSpeed's own default is the training dtype.
    grad_reduce_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    # Bound on every collective wait (NCCL's watchdog aborts after it). Ranks wait this long while
    # rank 0 alone converts a checkpoint for another world size or exports fine-tuning weights.
    collective_timeout_minutes: float = 60.0
    # A rank silent this long (died, or its node failed) stops every rank, naming it; 0 disables.
    heartbeat_timeout_seconds: float = 300.0
    # ZeRO-Offload: optimizer states (offload_optimizer) and, under ZeRO-3, parameters
    # (offload_param) kept in CPU memory or on an NVMe drive (nvme_path); the optimizer is then
    # DeepSpeed's CPU Adam, with our parameter groups.
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    offload_param: Literal["none", "cpu", "nvme"] = "none"
    nvme_path: Optional[str] = None
    # A DeepSpeed JSON of your own as the base layer (everything the YAML does not own, e.g. ZeRO
    # bucket sizes, offloading, activation-memory options); also `--deepspeed_config FILE`.
    config_file: Optional[str] = None
    # Merged in last, over config_file; for one-off keys on the command line.
    extra: dict = field(default_factory=dict)

    def user_json(self) -> dict:
        """The DeepSpeed dict of ``config_file`` ({} without one), checked against the keys the
        YAML owns: ConfigError names the YAML key to set instead."""
        if self.config_file is None:
            return {}
        layer = _read_json(self.config_file)
        _reject_owned_keys(layer, f"deepspeed.config_file {self.config_file}")
        return layer


# DeepSpeed keys the YAML decides, and where: the training loop reads those values too, so a
# second source would silently disagree with it (DeepSpeed accumulating 4 micro-batches while the
# loop counts 1).
YAML_OWNED_DEEPSPEED_KEYS = {
    "train_batch_size": "data.batch_size and optim.grad_accum (× the world size)",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "optim.grad_accum",
    "gradient_clipping": "optim.grad_clip",
    "bf16": "deepspeed.precision",
    "fp16": "deepspeed.precision",
    "amp": "deepspeed.precision",
    "communication_data_type": "deepspeed.grad_reduce_dtype",
    "optimizer": "optim (our AdamW with its layer-wise LR groups)",
    "scheduler": "schedule and optim.lr (our warm-up and cosine, set every step)",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "checkpoint.load_universal": "checkpoint.universal",
}


def _reject_owned_keys(layer: dict, where: str) -> None:
    for dotted, owner in YAML_OWNED_DEEPSPEED_KEYS.items():
        node: Any = layer
        for key in dotted.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            raise ConfigError(f"{where} sets '{dotted}', which the YAML owns: set {owner} instead.")


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
    except OSError as exc:
        raise ConfigError(f"deepspeed.config_file {path} cannot be read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed.config_file {path} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"deepspeed.config_file {path} must hold a JSON object.")
    return value


@dataclass
class PretrainConfig:
    run_dir: str = "runs/pretrain"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    activation_checkpointing: ActivationCheckpointingConfig = field(
        default_factory=ActivationCheckpointingConfig)
    text: TextConfig = field(default_factory=TextConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)

    def validate(self) -> "PretrainConfig":
        """Cross-field checks; raises ConfigError naming the field and the fix."""
        _check(self.optim.grad_accum >= 1, "optim.grad_accum must be ≥ 1.")
        _check(self.optim.lr > 0, "optim.lr must be > 0.")
        _check(0 < self.optim.layer_decay <= 1, "optim.layer_decay must be in (0, 1].")
        _check(self.optim.dcn_lr_mult > 0, "optim.dcn_lr_mult must be > 0.")
        _check(self.optim.grad_clip >= 0, "optim.grad_clip must be ≥ 0 (0 disables clipping).")
        _check(self.schedule.total_steps is None or self.schedule.total_steps > 0,
               "schedule.total_steps must be > 0 (or null to use schedule.epochs).")
        _check(self.schedule.epochs > 0, "schedule.epochs must be > 0.")
        _check(self.schedule.max_nonfinite_steps >= 1, "schedule.max_nonfinite_steps must be ≥ 1.")
        _check(0 <= self.ema.decay < 1, "ema.decay must be in [0, 1).")
        _check(self.checkpoint.every_steps >= 0, "checkpoint.every_steps must be ≥ 0 (0: only at the end).")
        _check(self.checkpoint.keep_last >= 1, "checkpoint.keep_last must be ≥ 1.")
        _check(self.activation_checkpointing.every_blocks >= 1,
               "activation_checkpointing.every_blocks must be ≥ 1.")
        if isinstance(self.activation_checkpointing.enabled, list):
            _check(len(self.activation_checkpointing.enabled) == 4,
                   "activation_checkpointing.enabled takes true/false or one flag per stage (4 flags).")
        _check(self.objective.init_temperature > 0, "objective.init_temperature must be > 0.")
        _check(self.logging.every_steps >= 1, "logging.every_steps must be ≥ 1.")
        _check(not self.logging.wandb.enabled or importlib.util.find_spec("wandb") is not None,
               "logging.wandb.enabled=true needs the wandb package: pip install wandb "
               "(or set logging.wandb.enabled=false).")
        _check(self.deepspeed.grad_reduce_dtype in ("fp32", self.deepspeed.precision),
               f"deepspeed.grad_reduce_dtype must be fp32 or the training precision "
               f"({self.deepspeed.precision}), got {self.deepspeed.grad_reduce_dtype}.")
        _check(self.deepspeed.collective_timeout_minutes > 0,
               "deepspeed.collective_timeout_minutes must be > 0.")
        _check(self.deepspeed.heartbeat_timeout_seconds >= 0,
               "deepspeed.heartbeat_timeout_seconds must be >= 0 (0 disables the heartbeat).")
        if self.model.compile:
            _check_compile_backend(self.model.compile_backend)
        self.deepspeed.user_json()
        _reject_owned_keys(self.deepspeed.extra, "deepspeed.extra")
        d = self.deepspeed
        _check("nvme" not in (d.offload_optimizer, d.offload_param) or d.nvme_path is not None,
               "deepspeed.offload_* = nvme needs deepspeed.nvme_path (a folder on a local NVMe drive).")
        _check(d.offload_param == "none" or d.zero_stage == 3,
               "deepspeed.offload_param needs deepspeed.zero_stage=3 (parameters are partitioned only there).")
        _check(d.offload_optimizer == "none" or d.zero_stage >= 1,
               "deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1.")
        kinds = {s.kind for s in self.data.train_sources}
        if self.objective.kind == "supervised":
            _check(kinds <= {"class"}, "objective.kind=supervised needs only kind=class sources "
                   f"(got {sorted(kinds)}); use objective.kind=mixed for caption sources.")
        if self.objective.kind == "contrastive":
            _check(kinds <= {"caption"}, "objective.kind=contrastive needs only kind=caption sources "
                   f"(got {sorted(kinds)}); use objective.kind=mixed for class sources.")
        self._validate_eval()
        _check(self.objective.kind == "supervised" or "caption" not in kinds or self.data.tokenizer is not None
               or self.data.allow_byte_tokenizer,
               f"objective.kind={self.objective.kind} on caption sources needs a text tokenizer file: set "
               "data.tokenizer to CLIP's bpe_simple_vocab_16e6.txt.gz (README, Data: where to get it) or a "
               "HuggingFace tokenizers .json. The byte-level fallback fits ~4x less caption text into "
               "data.context_length; to train with it anyway set data.allow_byte_tokenizer=true.")
        self.data.validate()
        return self

    def _validate_eval(self) -> None:
        text_tower = self.objective.kind != "supervised"
        _check(text_tower or self.eval.class_names is None,
               "eval.class_names (zero-shot classification) needs the text tower: objective.kind=contrastive "
               "or mixed; set eval.class_names=null for a supervised run.")
        _check(text_tower or self.data.val_caption_shards is None,
               "data.val_caption_shards (image-text retrieval) needs the text tower: objective.kind=contrastive "
               "or mixed; set data.val_caption_shards=null for a supervised run.")
        _check(bool(self.eval.prompt_templates) and all("{}" in t for t in self.eval.prompt_templates),
               f"eval.prompt_templates must be a non-empty list of prompts each holding '{{}}' where the class "
               f"name goes, e.g. ['a photo of a {{}}.'], got {self.eval.prompt_templates!r}.")
        if self.eval.class_names is None:
            return
        try:
            names = load_class_names(self.eval.class_names)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"eval.class_names: {exc}") from None
        # A mixed run reads one set of labels (data.val_shards) with both the head and the names.
        _check(self.objective.kind != "mixed" or len(names) == self.model.num_classes,
               f"eval.class_names {self.eval.class_names!r} names {len(names)} classes but model.num_classes is "
               f"{self.model.num_classes}: the validation labels index both; use the list of the head's classes.")


def _check_compile_backend(backend: str) -> None:
    import torch._dynamo
    known = torch._dynamo.list_backends(exclude_tags=())
    _check(backend in known, f"model.compile_backend={backend!r} is not a torch.compile backend; "
           f"known: {', '.join(known)} (inductor on GPUs; aot_eager traces without generating code).")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# Short forms accepted on the command line.
OVERRIDE_ALIASES = {"resume": "checkpoint.resume"}
# Keys that moved: using an old one is an error naming the new one.
RENAMED_KEYS = {"model.grad_checkpointing": "activation_checkpointing.enabled",
                "model.checkpoint_every": "activation_checkpointing.every_blocks"}


def _reject_renamed(keys: list[str], where: str) -> None:
    dotted = ".".join(keys)
    if dotted in RENAMED_KEYS:
        raise ConfigError(f"'{dotted}' ({where}) was renamed: use '{RENAMED_KEYS[dotted]}' (activation "
                          "recomputation has its own section; 'checkpoint' is for saving the run).")


def _reject_renamed_in_tree(tree: dict, where: str) -> None:
    for old in RENAMED_KEYS:
        section, key = old.split(".")
        if isinstance(tree.get(section), dict) and key in tree[section]:
            _reject_renamed([section, key], where)


def config_tree(path: Optional[str], overrides: list[str], schema: type) -> dict[str, Any]:
    """The YAML tree of ``path`` (with its ``base:`` chain) with ``key.sub=value`` overrides applied,
    each key checked against the dataclass ``schema``."""
    tree = copy.deepcopy(read_yaml_tree(path)) if path is not None else {}
    _reject_renamed_in_tree(tree, f"in {path}")
    given: dict[str, str] = {}
    for text in overrides:
        keys, value = parse_override(text)
        dotted = OVERRIDE_ALIASES.get(".".join(keys), ".".join(keys))
        if dotted in given:  # the last would win silently, e.g. after a remote shell expanded braces
            raise ConfigError(f"'{dotted}' is given twice ({given[dotted]!r} and {text!r}): give it once.")
        given[dotted] = text
        keys = dotted.split(".")
        _reject_renamed(keys, "on the command line")
        apply_override(tree, keys, value, schema)
    return tree


def load_config(path: Optional[str], overrides: list[str] = ()) -> PretrainConfig:
    """YAML file (or defaults when ``path`` is None) + ``key.sub=value`` overrides → validated config."""
    return from_dict(PretrainConfig, config_tree(path, overrides, PretrainConfig)).validate()


def config_to_dict(cfg: PretrainConfig) -> dict:
    return to_dict(cfg)


# Characters a remote shell would read as more than a path.
_SHELL_SPECIAL = set(" \t\n'\"$`\\{}*?[]();&|<>!~#")


def write_launch_config(cfg: PretrainConfig) -> None:
    """For a launch whose ranks receive their arguments through a remote shell (pdsh re-parses
    them there: a brace pattern would expand into thousands of overrides, ``$VAR`` to the remote
    value), the resolved config is written once to ``RUN_DIR/launch_config.yaml`` (a folder every
    node sees) and only its path is passed. Writes that path to the file named by the environment
    variable INTERNIMAGE_RESOLVED_OUT; does nothing without it."""
    out = os.environ.get("INTERNIMAGE_RESOLVED_OUT")
    if not out:
        return
    path = os.path.abspath(os.path.join(cfg.run_dir, "launch_config.yaml"))
    if _SHELL_SPECIAL & set(path):
        raise ConfigError(f"run_dir {cfg.run_dir!r}: a multi-node launch through pdsh passes its path "
                          "through a remote shell; use a path without spaces or shell characters.")
    os.makedirs(cfg.run_dir, exist_ok=True)
    save_config(cfg, path)
    atomic_write_text(out, path)


def save_config(cfg: PretrainConfig, path: str) -> None:
    """Writes the resolved config as YAML (loadable again by ``load_config``)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
