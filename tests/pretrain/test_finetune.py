"""Stage-wise fine-tuning (issue: 224 → 384 → 640 style), on 2 CPU processes with the demo data."""
import json
import os
import signal
import subprocess
import time

import pytest
import torch

from internimage.model import create_model
from internimage.pretrain.config import ConfigError
from internimage.pretrain.checkpoint import export_weights
from internimage.pretrain.finetuning import load_finetune_config, prepare_stage_weights, stage_config

from tests.pretrain.pretrain_helpers import REPO, cpu_env, deepspeed_cmd, free_port, run, tail

DEMO_ARCH = dict(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8))


def data_overrides(demo_data: str) -> list[str]:
    return [f"data.train_sources.0.shards={demo_data}/classes/train-{{000000..000003}}.tar",
            f"data.val_shards={demo_data}/classes/val-000000.tar"]


@pytest.fixture(scope="module")
def pretraining_run(demo_data, tmp_path_factory):
    """A short demo pretraining run (2 ranks, ZeRO-3, EMA on): the fine-tuning source."""
    run_dir = str(tmp_path_factory.mktemp("pretrain_run"))
    result = run(deepspeed_cmd(2, "--module", "internimage.pretrain.train", "configs/demo.yaml",
                               f"run_dir={run_dir}", "schedule.total_steps=6", "eval.at_end=false",
                               "logging.progress_bar=false", *data_overrides(demo_data)))
    assert result.returncode == 0, tail(result)
    return run_dir


def finetune_args(source: str, run_dir: str, demo_data: str) -> list[str]:
    return ["configs/finetune_demo.yaml", f"init.source={source}", f"run_dir={run_dir}",
            "stages.0.schedule.total_steps=4", "stages.1.schedule.total_steps=8", "checkpoint.every_steps=2",
            "eval.max_batches=2", "logging.progress_bar=false", *data_overrides(demo_data)]


@pytest.mark.multiprocess
def test_two_stages_resume_inside_stage_two_after_a_kill(pretraining_run, demo_data, tmp_path):
    run_dir = str(tmp_path / "finetune")
    cmd = deepspeed_cmd(2, "--module", "internimage.pretrain.finetune",
                        *finetune_args(pretraining_run, run_dir, demo_data), port=free_port())
    stage2_latest = os.path.join(run_dir, "1-res64", "checkpoints", "latest")
    job = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)
    deadline = time.time() + 240
    while not os.path.exists(stage2_latest) and job.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert os.path.exists(stage2_latest), job.communicate()[0][-4000:] if job.poll() is not None else "timeout"
    os.killpg(job.pid, signal.SIGKILL)  # the whole launcher tree, as a node failure would
    job.wait()
    assert not os.path.exists(os.path.join(run_dir, "1-res64", "stage_result.json"))
    stage1_metrics = open(os.path.join(run_dir, "0-res48", "metrics.jsonl")).read()

    resumed = run(cmd)
    assert resumed.returncode == 0, tail(resumed)
    out = resumed.stdout + resumed.stderr
    assert "resumed from" in out and "1-res64/checkpoints/step_" in out
    assert "stage res48: starting weights" not in out  # the finished stage is not redone
    assert open(os.path.join(run_dir, "0-res48", "metrics.jsonl")).read() == stage1_metrics

    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert [(row["stage"], row["img_size"]) for row in summary] == [("res48", 48), ("res64", 64)]
    assert all(row["top1"] is not None and row["ema_top1"] is not None for row in summary)
    assert "fine-tuning summary" in out and "res64" in open(os.path.join(run_dir, "summary.txt")).read()

    # Stage 2 started from stage 1's final EMA weights: its init.pth is exactly that export.
    stage1_final = export_weights(os.path.join(run_dir, "0-res48"), str(tmp_path / "s1.pth"), ema=True)["model"]
    stage2_init = torch.load(os.path.join(run_dir, "1-res64", "init.pth"), weights_only=True)["model"]
    assert stage2_init.keys() == stage1_final.keys()
    assert all(torch.equal(stage2_init[k], stage1_final[k]) for k in stage1_final)

    again = run(cmd)  # a finished run is not redone
    assert again.returncode == 0 and "resumed from" not in again.stdout + again.stderr


def demo_finetune_config(tmp_path, source: str, **stage0):
    overrides = [f"init.source={source}", f"run_dir={tmp_path / 'ft'}"]
    overrides += [f"stages.0.{k}={v}" for k, v in stage0.items()]
    return load_finetune_config(str(REPO_CONFIG), overrides, world_size=2)


REPO_CONFIG = os.path.join(REPO, "configs", "finetune_demo.yaml")


def prepared_stage0(cfg) -> dict[str, torch.Tensor]:
    stage_cfg = stage_config(cfg, 0, world_size=2)
    path = prepare_stage_weights(cfg, 0, stage_cfg, world=2)
    state = torch.load(path, weights_only=True)["model"]
    create_model("internimage_t", num_classes=stage_cfg.model.num_classes, pretrained=path, **DEMO_ARCH)
    return state


def official_format(num_classes: int) -> dict[str, torch.Tensor]:
    model = create_model("internimage_t", num_classes=num_classes, **DEMO_ARCH)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_starts_from_an_exported_pth(tmp_path):
    weights = official_format(10)
    torch.save({"model": weights, "step": 9}, tmp_path / "exported.pth")
    state = prepared_stage0(demo_finetune_config(tmp_path, str(tmp_path / "exported.pth")))
    assert all(torch.equal(state[k], weights[k]) for k in weights)  # same classes: the head is kept


def test_starts_from_an_official_22k_checkpoint_with_student_prefix_and_class_remap(tmp_path):
    weights = official_format(21841)
    torch.save({"model": {f"student.{k}": v for k, v in weights.items()}}, tmp_path / "official_22k.pth")
    rows = [21840, 5, 17, 0, 999, 123, 4567, 8, 9, 10]
    (tmp_path / "classes.txt").write_text("\n".join(map(str, rows)))
    cfg = demo_finetune_config(tmp_path, str(tmp_path / "official_22k.pth"),
                               class_indices=str(tmp_path / "classes.txt"))
    state = prepared_stage0(cfg)
    assert torch.equal(state["head.weight"], weights["head.weight"][rows])
    assert torch.equal(state["levels.2.blocks.1.dcn.offset.weight"], weights["levels.2.blocks.1.dcn.offset.weight"])


def test_a_head_of_another_size_is_replaced_by_a_small_new_one(tmp_path):
    weights = official_format(21841)
    torch.save({"model": weights}, tmp_path / "official_22k.pth")
    state = prepared_stage0(demo_finetune_config(tmp_path, str(tmp_path / "official_22k.pth")))
    assert state["head.weight"].shape == (10, 192)
    assert 0 < state["head.weight"].std() < 2e-3 and not state["head.bias"].any()
    assert torch.equal(state["conv_head.0.weight"], weights["conv_head.0.weight"])  # the rest of the head stays


@pytest.mark.parametrize("override, message", [
    ("stages=[{name: a}]", "stages\\[0\\] lacks data.img_size"),
    ("stages.1.global_batch=60", "global_batch 60 is not divisible by batch_size 16 × 2 ranks"),
    ("stages=[]", "stages is empty"),
    ("stages=[{name: a, data: {img_size: 32}}, {name: a, data: {img_size: 48}}]", "stage names must be unique"),
    ("stages.0.img_size=48", "Unknown config key 'stages.0.img_size'. Stages change config sections: "
                             "write stages.0.data.img_size"),
    ("stages.0.data.img_sz=48", "Unknown config key 'stages.0.data.img_sz'. Did you mean 'img_size'"),
    ("stages.0.optim.lr=fast", "stages.0.optim.lr: expected a number"),
    ("stages.1.class_indices=/nonexistent/classes.txt", "class_indices file /nonexistent/classes.txt does not exist"),
])
def test_bad_stage_lists_are_rejected_before_work_starts(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_finetune_config(REPO_CONFIG, [f"run_dir={tmp_path}", override], world_size=2)


def test_launcher_rejects_a_bad_config_without_starting_processes(tmp_path):
    result = subprocess.run(["bash", "launch/finetune.sh", "configs/finetune_demo.yaml", "stages=[{name: a}]",
                             f"run_dir={tmp_path}"], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert "lacks data.img_size" in result.stderr and "deepspeed" not in result.stdout


@pytest.mark.parametrize("config, world_size", [("finetune_internimage_h_22k_384_1k_640.yaml", 64),
                                                ("finetune_internimage_t_1k_224_384.yaml", 8)])
def test_shipped_recipes_keep_their_global_batch_at_every_resolution(config, world_size):
    # The 22K → 1K index file is the user's to supply (docs/model.md §5); the recipe names where it goes.
    overrides = ["stages.1.class_indices=null"] if "22k_384_1k" in config else []
    cfg = load_finetune_config(os.path.join(REPO, "configs", config), overrides, world_size=world_size)
    for index in range(len(cfg.stages)):
        stage_cfg = stage_config(cfg, index, world_size)
        assert stage_cfg.data.batch_size * stage_cfg.optim.grad_accum * world_size == cfg.stage(index).global_batch
        assert stage_cfg.optim.layer_decay == 0.9 and stage_cfg.ema.decay == 0.9999
        assert stage_cfg.data.label_smoothing == 0.3 and stage_cfg.deepspeed.zero_stage == 3
    sizes = [stage_config(cfg, i, world_size).data.img_size for i in range(len(cfg.stages))]
    assert sizes == sorted(sizes)


def test_a_stage_warmup_in_epochs_replaces_shared_warmup_steps(tmp_path):
    cfg = load_finetune_config(REPO_CONFIG, [f"run_dir={tmp_path}", "schedule.warmup_steps=5",
                                             "stages.0.schedule.warmup_epochs=2"], world_size=2)
    assert stage_config(cfg, 0, 2).schedule.warmup_steps is None
    assert stage_config(cfg, 1, 2).schedule.warmup_steps == 5


@pytest.mark.parametrize("entry", ["internimage.pretrain.train", "internimage.pretrain.finetune"])
def test_a_stray_positional_argument_is_a_config_error_not_a_traceback(entry, capsys):
    import importlib
    main = importlib.import_module(entry).main
    assert main(["configs/demo.yaml", "extra"]) == 2
    assert "Unexpected argument 'extra'" in capsys.readouterr().err

