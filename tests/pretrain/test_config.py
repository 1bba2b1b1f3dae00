"""The config: YAML + overrides into typed dataclasses; mistakes fail early and say the fix."""
import glob
import json
import os

import pytest

from internimage.pretrain.config import ConfigError, PretrainConfig, load_config, save_config
from tests.paths import REPO

DEMO = os.path.join(REPO, "configs", "demo.yaml")


@pytest.mark.parametrize("path", [DEMO] + sorted(glob.glob(os.path.join(REPO, "configs", "pretrain_*.yaml"))))
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), PretrainConfig)


def test_overrides_are_typed_and_reach_nested_lists():
    cfg = load_config(DEMO, ["optim.lr=1e-3", "activation_checkpointing.enabled=[true, false, true, false]",
                             "data.train_sources.0.weight=2", "resume=/x/checkpoints/step_00000010",
                             "optim.betas=[0.9, 0.95]"])
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)
    assert cfg.activation_checkpointing.enabled == [True, False, True, False]
    assert cfg.data.train_sources[0].weight == 2.0
    assert cfg.checkpoint.resume == "/x/checkpoints/step_00000010"
    assert cfg.optim.betas == (0.9, 0.95)


@pytest.mark.parametrize("override, hint", [
    ("optim.lrr=0.1", "Did you mean 'lr'"),
    ("optimm.lr=0.1", "Did you mean 'optim'"),
    ("data.batchsize=3", "Did you mean 'batch_size'"),
    ("data.train_sources.0.weigth=3", "Did you mean 'weight'"),
])
def test_unknown_keys_are_rejected_with_the_closest_valid_key(override, hint):
    with pytest.raises(ConfigError, match=hint):
        load_config(DEMO, [override])


@pytest.mark.parametrize("override, words", [
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("schedule.total_steps=2.5", "schedule.total_steps: expected an integer"),
    ("objective.kind=magic", "not one of"),
    ("deepspeed.zero_stage=4", "not one of"),
    ("optim.grad_accum=0", "grad_accum must be"),
    ("objective.kind=contrastive", "needs only kind=caption sources"),
    ("activation_checkpointing.enabled=[true, false]", "one flag per stage"),
    ("data.batch_size=0", "batch_size"),
    ("optim.lr", "must look like key.sub=value"),
    ("deepspeed.offload_optimizer=nvme", "needs deepspeed.nvme_path"),
])
def test_bad_values_name_the_field(override, words):
    with pytest.raises((ConfigError, ValueError), match=words):
        load_config(DEMO, [override])


def test_resolved_config_round_trips_through_the_saved_yaml(tmp_path):
    cfg = load_config(DEMO, ["optim.lr=3e-4", "activation_checkpointing.enabled=[true, true, false, false]"])
    path = str(tmp_path / "config.yaml")
    save_config(cfg, path)
    assert load_config(path) == cfg


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("old, new", [("model.grad_checkpointing", "activation_checkpointing.enabled"),
                                      ("model.checkpoint_every", "activation_checkpointing.every_blocks")])
def test_activation_checkpointing_keys_that_moved_name_their_new_place(old, new, tmp_path):
    """Recomputation is not checkpoint saving: it has its own section, and the old keys say where."""
    with pytest.raises(ConfigError, match=f"'{old}' \\(on the command line\\) was renamed: use '{new}'"):
        load_config(DEMO, [f"{old}=true" if "grad" in old else f"{old}=2"])
    section, key = old.split(".")
    path = tmp_path / "old.yaml"
    path.write_text(f"base: {DEMO}\n{section}:\n  {key}: true\n")
    with pytest.raises(ConfigError, match=f"was renamed: use '{new}'"):
        load_config(str(path))


@pytest.mark.parametrize("key, owner", [("gradient_accumulation_steps", "optim.grad_accum"),
                                        ("train_micro_batch_size_per_gpu", "data.batch_size"),
                                        ("gradient_clipping", "optim.grad_clip"),
                                        ("bf16", "deepspeed.precision"),
                                        ("zero_optimization", "deepspeed.zero_stage")])
def test_deepspeed_extra_may_not_set_what_the_yaml_owns(key, owner):
    value = {"bf16": "{enabled: true}", "zero_optimization": "{stage: 2}"}.get(key, "4")
    with pytest.raises(ConfigError, match=f"deepspeed.extra sets '{key}.*set {owner} instead"):
        load_config(DEMO, [f"deepspeed.extra.{key}={value}"])


def test_a_users_deepspeed_json_is_the_base_layer_under_the_yaml(tmp_path):
    from internimage.pretrain.engine import deepspeed_config
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123, "stage": 3},
                                   "steps_per_print": 7}))
    with pytest.raises(ConfigError, match="config_file .* sets 'zero_optimization.stage'.*deepspeed.zero_stage"):
        load_config(DEMO, [f"deepspeed.config_file={ds_json}"])
    ds_json.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123}, "steps_per_print": 7,
                                   "wall_clock_breakdown": True}))
    cfg = load_config(DEMO, [f"deepspeed.config_file={ds_json}", "deepspeed.extra.steps_per_print=9"])
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 123 and ds["zero_optimization"]["stage"] == 3
    assert ds["train_micro_batch_size_per_gpu"] == cfg.data.batch_size
    assert ds["wall_clock_breakdown"] is False  # ours over the user's JSON
    assert ds["steps_per_print"] == 9  # extra over both


def test_deepspeeds_command_line_habits_are_understood():
    from internimage.pretrain.entry import parse_cli
    assert parse_cli(["c.yaml", "--deepspeed", "--deepspeed_config", "ds.json", "optim.lr=1"]) == \
        ("c.yaml", ["deepspeed.config_file=ds.json", "optim.lr=1"])
    assert parse_cli(["--local_rank=0", "--deepspeed_config=x.json"]) == (None, ["deepspeed.config_file=x.json"])
    with pytest.raises(ConfigError, match="needs a file"):
        parse_cli(["--deepspeed_config"])


LAION = os.path.join(REPO, "configs", "pretrain_internimage_h_laion_22k.yaml")


def test_captions_without_a_tokenizer_file_need_the_byte_level_fallback_said_explicitly():
    """A contrastive run on real captions with the byte-level tokenizer (a dozen words in 77 tokens) is
    refused before any process starts; the error names the file to get and the key that allows it."""
    assert load_config(LAION).data.tokenizer.endswith("bpe_simple_vocab_16e6.txt.gz")
    with pytest.raises(ConfigError, match=r"bpe_simple_vocab_16e6.txt.gz .*data.allow_byte_tokenizer=true"):
        load_config(LAION, ["data.tokenizer=null"])
    assert load_config(LAION, ["data.tokenizer=null", "data.allow_byte_tokenizer=true"]).data.tokenizer is None
    captions = '[{name: c, shards: "/d/c-{0..9}.tar", kind: caption}]'
    with pytest.raises(ConfigError, match="objective.kind=contrastive on caption sources needs a text tokenizer"):
        load_config(DEMO, ["objective.kind=contrastive", f"data.train_sources={captions}"])


def test_wandb_enabled_without_the_package_names_the_install(monkeypatch):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError, match="logging.wandb.enabled=true needs the wandb package: pip install wandb"):
        load_config(DEMO, ["logging.wandb.enabled=true"])
    assert load_config(DEMO, ["logging.wandb.project=x"]).logging.wandb.enabled is False
