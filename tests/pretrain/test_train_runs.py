"""End-to-end pretraining runs: 2 real CPU processes (gloo, ZeRO-3, bf16) on the demo shards.

Every run goes through ``launch/pretrain.sh`` or the ``deepspeed`` launcher, like a user's would.
One uninterrupted reference run is shared; interrupted runs must end with its exact weights.
"""
import glob
import importlib.util
import json
import os
import signal
import subprocess
import time

import psutil
import pytest
import torch

from tests.pretrain.pretrain_helpers import REPO, cpu_env, deepspeed_cmd, free_port, run, tail

pytestmark = pytest.mark.multiprocess  # every test here starts a real 2-rank process group

STEPS = 6


def _overrides(demo_data, run_dir, **extra):
    values = {
        "run_dir": run_dir,
        "data.train_sources.0.shards": f"{demo_data}/classes/train-{{000000..000003}}.tar",
        "data.val_shards": f"{demo_data}/classes/val-000000.tar",
        "data.batch_size": 16,
        "model.arch": "{channels: 8, depths: [1, 1, 1, 1], groups: [1, 1, 2, 2]}",
        "schedule.total_steps": STEPS,
        "schedule.warmup_steps": 1,
        "optim.lr": 4e-3,
        "checkpoint.every_steps": 2,
        "checkpoint.keep_last": 2,
        "logging.every_steps": 1,
        "logging.progress_bar": "false",
        "eval.max_batches": 2,
        "ema.decay": 0.5,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def _train_cmd(demo_data, run_dir, port=None, **extra):
    return deepspeed_cmd(2, "--module", "internimage.pretrain.train", "configs/demo.yaml",
                         *_overrides(demo_data, run_dir, **extra), port=port)


def _latest(run_dir):
    path = os.path.join(run_dir, "checkpoints", "latest")
    return open(path).read().strip() if os.path.exists(path) else None


def _state(run_dir, tag=None):
    tag = tag or _latest(run_dir)
    with open(os.path.join(run_dir, "checkpoints", tag, "trainer_state.json")) as f:
        return json.load(f)


def _weights(run_dir, ema=False):
    from internimage.pretrain.checkpoint import resolve_resume
    from internimage.pretrain.checkpoint import consolidated_weights
    return consolidated_weights(resolve_resume(run_dir, run_dir), ema=ema)


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst == 0.0, f"weights differ by up to {worst}"


def _train_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "eval"]


@pytest.fixture(scope="module")
def reference_run(demo_data, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("reference"))
    result = run(_train_cmd(demo_data, run_dir))
    assert result.returncode == 0, tail(result)
    return run_dir


def _wait_for(predicate, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def _start(cmd):
    return subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_reference_run_learns_checkpoints_and_evaluates(reference_run):
    train, evals = _train_metrics(reference_run)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    losses = [r["loss/loss"] for r in train]
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    assert all(r["images_per_s"] > 0 and 0 <= r["data_wait_fraction"] <= 1 for r in train)
    assert evals and 0.0 <= evals[-1]["top1"] <= 1.0 and "ema_top1" in evals[-1]
    assert _latest(reference_run) == f"step_{STEPS:08d}"
    kept = sorted(d for d in os.listdir(os.path.join(reference_run, "checkpoints")) if d.startswith("step_"))
    assert kept == [f"step_{STEPS - 2:08d}", f"step_{STEPS:08d}"]  # keep_last=2
    state = _state(reference_run)
    assert state["step"] == STEPS and state["world_size"] == 2 and state["samples"] == STEPS * 32
    assert os.path.exists(os.path.join(reference_run, "config.yaml"))
    assert json.load(open(os.path.join(reference_run, "model_report.json")))["flops"] > 0
    for key in ("lr", "grad_norm", "images_per_s_per_device", "tflops_per_device", "peak_memory_gib",
                "skipped_steps", "skipped_samples/corrupt_image"):
        assert key in train[-1], key
    assert "mfu" not in train[-1]  # no known peak for a CPU
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(reference_run, "tensorboard")))
    passed_to_deepspeed = json.load(open(os.path.join(reference_run, "ds_config.json")))
    assert passed_to_deepspeed["train_micro_batch_size_per_gpu"] == 16
    assert passed_to_deepspeed["zero_optimization"]["stage"] == 3 and passed_to_deepspeed["bf16"]["enabled"]


def test_sigkill_then_same_command_resumes_to_identical_weights(demo_data, reference_run, tmp_path):
    run_dir = str(tmp_path / "killed")
    cmd = _train_cmd(demo_data, run_dir)
    proc = _start(cmd)
    reached = _wait_for(lambda: _latest(run_dir) == "step_00000004", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert reached, proc.stdout.read()[-4000:]
    result = run(cmd)
    assert result.returncode == 0, tail(result)
    assert "resumed from" in result.stdout + result.stderr
    _assert_same_weights(_weights(run_dir), _weights(reference_run))
    _assert_same_weights(_weights(run_dir, ema=True), _weights(reference_run, ema=True))


def test_kill_during_checkpoint_save_keeps_latest_on_the_previous_checkpoint(demo_data, tmp_path):
    run_dir = str(tmp_path / "crash_in_save")
    # Rank 1 dies after DeepSpeed wrote the step-4 shards but before every rank finished.
    crashed = run(_train_cmd(demo_data, run_dir), INTERNIMAGE_FAULT="save:step_00000004:1")
    assert crashed.returncode != 0
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "step_00000004"))  # the partial one
    assert _latest(run_dir) == "step_00000002"
    # What latest names is complete: it consolidates, and equals the uninterrupted run's step 2.
    assert _state(run_dir)["step"] == 2
    from internimage.pretrain.checkpoint import ResumePoint
    from internimage.pretrain.checkpoint import consolidated_weights
    from internimage.pretrain.state import RunState
    ours = consolidated_weights(ResumePoint(os.path.join(run_dir, "checkpoints"), "step_00000002",
                                            RunState.from_json(_state(run_dir))))
    assert all(torch.isfinite(v.float()).all() for v in ours.values())


@pytest.mark.parametrize("signum, rank", [(signal.SIGTERM, 1), (signal.SIGUSR1, 0)])
def test_preemption_signal_on_one_rank_checkpoints_all_ranks_and_exits_cleanly(demo_data, tmp_path,
                                                                                signum, rank):
    run_dir = str(tmp_path / "preempted")
    proc = _start(_train_cmd(demo_data, run_dir, **{"schedule.total_steps": 500,
                                                    "checkpoint.every_steps": 0}))
    metrics = os.path.join(run_dir, "metrics.jsonl")
    assert _wait_for(lambda: os.path.exists(metrics) and os.path.getsize(metrics) > 0, proc), \
        proc.stdout.read()[-4000:]
    launcher = [p for p in psutil.Process(proc.pid).children(recursive=True)
                if "deepspeed.launcher.launch" in " ".join(p.cmdline())]
    ranks = launcher[0].children()  # the per-rank processes (their data workers are grandchildren)
    assert len(ranks) == 2
    ranks = sorted(ranks, key=lambda p: p.pid)  # spawned in rank order
    ranks[rank].send_signal(signum)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-4000:]
    assert "preempted: checkpoint saved" in output
    state = _state(run_dir)
    assert 1 <= state["step"] < 500


def test_a_stop_signal_to_the_whole_job_saves_exits_0_and_the_same_command_finishes_the_run(
        demo_data, reference_run, tmp_path):
    """SIGTERM to every process of `launch/pretrain.sh` (what Slurm and `kill -TERM -PGID` do): data
    workers included, and the deepspeed launcher, which exits 1 once signalled."""
    run_dir = str(tmp_path / "job_signalled")
    cmd = ["bash", "launch/pretrain.sh", "configs/demo.yaml", *_overrides(demo_data, run_dir)]
    proc = _start(cmd)  # its own process group
    reached = _wait_for(lambda: _latest(run_dir) == "step_00000002", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert reached and proc.returncode == 0, output[-6000:]
    assert "preempted: checkpoint saved" in output and "killed by signal" not in output, output[-6000:]
    step = _state(run_dir)["step"]
    assert 2 <= step < STEPS and _latest(run_dir) == f"step_{step:08d}"
    assert json.load(open(os.path.join(run_dir, "preempted.json")))["step"] == step

    result = run(cmd)
    assert result.returncode == 0, tail(result)
    assert not os.path.exists(os.path.join(run_dir, "preempted.json"))
    _assert_same_weights(_weights(run_dir), _weights(reference_run))
    _assert_same_weights(_weights(run_dir, ema=True), _weights(reference_run, ema=True))


def _node_env(mode: str, node: int, tmp_path, port: int) -> dict:
    """How each of 2 nodes learns its place: a hostfile plus NODE_RANK, or Slurm's variables (a
    stand-in `scontrol` expands the node list to two names of this machine)."""
    if mode == "node_rank":
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
        return cpu_env(HOSTFILE=str(hostfile), NODE_RANK=node, MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames node[0-1]" ] && '
                        'printf "localhost\\n127.0.0.1\\n"\n')
    scontrol.chmod(0o755)
    return cpu_env(PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(tmp_path), SLURM_JOB_ID=42,
                   SLURM_NNODES=2, SLURM_NODEID=node, SLURM_JOB_NODELIST="node[0-1]",
                   NPROC_PER_NODE=1, MASTER_PORT=port)


@pytest.mark.parametrize("mode", ["node_rank", "slurm"])
def test_two_nodes_of_one_process_through_the_launcher(demo_data, tmp_path, mode):
    run_dir = str(tmp_path / "two_nodes")
    port = free_port()
    overrides = _overrides(demo_data, run_dir, **{"schedule.total_steps": 2, "eval.at_end": "false"})
    procs = [subprocess.Popen(["bash", "launch/pretrain.sh", "configs/demo.yaml", *overrides], cwd=REPO,
                              env=_node_env(mode, i, tmp_path, port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert _state(run_dir)["world_size"] == 2
    if mode == "slurm":  # the launcher wrote one hostfile per node from the Slurm node list
        for node in range(2):
            hostfile = tmp_path / f"internimage_hostfile_42_{node}"
            assert hostfile.read_text() == "localhost slots=1\n127.0.0.1 slots=1\n"


def _resume_overrides(tag_dir, run_dir, **extra):
    """The reference run's overrides (its micro-batch included) for ``run_dir``, resuming from
    ``tag_dir`` and reading the shards that checkpoint's run read; ``extra`` on top."""
    data = json.load(open(os.path.join(tag_dir, "trainer_state.json")))["config"]["data"]
    return _overrides("unused", run_dir, **{"data.train_sources.0.shards": data["train_sources"][0]["shards"],
                                            "data.val_shards": data["val_shards"], "resume": tag_dir, **extra})


def test_universal_checkpoint_resumes_two_process_run_in_one_process(reference_run, tmp_path):
    run_dir = str(tmp_path / "one_process")
    start = os.path.join(reference_run, "checkpoints", f"step_{STEPS:08d}")
    overrides = _resume_overrides(start, run_dir, **{"data.batch_size": 32})
    result = run(["bash", "launch/pretrain.sh", "configs/demo.yaml", *overrides],
                 NPROC_PER_NODE=1, MASTER_PORT=free_port())
    assert result.returncode == 0, tail(result)
    assert "universal" in result.stdout + result.stderr
    state = _state(run_dir)
    assert state["world_size"] == 1 and state["step"] == STEPS
    _assert_same_weights(_weights(run_dir), _weights(reference_run))
    _assert_same_weights(_weights(run_dir, ema=True), _weights(reference_run, ema=True))


def _resume_at(start_tag_dir, run_dir, processes, batch_size):
    """The reference run's config, resumed from ``start_tag_dir`` on ``processes`` ranks of ``batch_size``."""
    overrides = _resume_overrides(start_tag_dir, run_dir, **{"data.batch_size": batch_size, "eval.at_end": "false"})
    result = run(["bash", "launch/pretrain.sh", "configs/demo.yaml", *overrides],
                 NPROC_PER_NODE=processes, MASTER_PORT=free_port())
    assert result.returncode == 0, tail(result)
    assert "universal" in result.stdout + result.stderr
    return _train_metrics(run_dir)[0]


def test_a_run_resumed_at_another_world_size_keeps_its_schedule_in_samples(reference_run, tmp_path):
    """The schedule is STEPS steps of 32 images (2 ranks × 16): 192 samples. Resumed at step 4 on one
    rank of 16 it needs 4 more steps; that run resumed at step 6 on two ranks of 16 needs one. The LR
    continues where the uninterrupted run had it at the same sample (the demo's LR is not scaled
    with the batch: optim.base_batch_size is null)."""
    reference, _ = _train_metrics(reference_run)
    lr_at_samples = {32 * (r["step"] - 1): r["lr"] for r in reference}  # LR of the step starting there

    shrunk_dir = str(tmp_path / "one_rank")
    shrunk = _resume_at(os.path.join(reference_run, "checkpoints", "step_00000004"), shrunk_dir, 1, 16)
    assert [r["step"] for r in shrunk] == [5, 6, 7, 8]
    assert [r["samples_seen"] for r in shrunk] == [144, 160, 176, 192]
    assert shrunk[0]["lr"] == pytest.approx(lr_at_samples[128], rel=1e-6)  # continues, not restarted
    assert shrunk[2]["lr"] == pytest.approx(lr_at_samples[160], rel=1e-6)
    assert _state(shrunk_dir)["step"] == 8 and _state(shrunk_dir)["samples"] == 192

    grown_dir = str(tmp_path / "two_ranks_again")
    grown = _resume_at(os.path.join(shrunk_dir, "checkpoints", "step_00000006"), grown_dir, 2, 16)
    assert [(r["step"], r["samples_seen"]) for r in grown] == [(7, 192)]
    assert grown[0]["lr"] == pytest.approx(lr_at_samples[160], rel=1e-6)
    state = _state(grown_dir)
    assert state["world_size"] == 2 and state["samples"] == 192 and state["schedule_batch"] == 32


def test_export_loads_into_create_model(reference_run, tmp_path):
    from internimage.model import create_model
    for ema in (False, True):
        out = str(tmp_path / f"model_{ema}.pth")
        args = ["-m", "internimage.pretrain.export", reference_run, "--out", out] + (["--ema"] if ema else [])
        result = subprocess.run([cpu_env()["PYTHON"], *args], cwd=REPO, env=cpu_env(),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, tail(result)
        payload = torch.load(out, weights_only=False)
        model = create_model(payload["model_name"], num_classes=payload["num_classes"], pretrained=out,
                             **payload["arch"])
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k].float(), v.float()) for k, v in payload["model"].items())
        assert set(loaded) == set(payload["model"])


def test_deepspeeds_own_zero_to_fp32_reads_our_checkpoints(reference_run, tmp_path):
    root = os.path.join(reference_run, "checkpoints")
    out = tmp_path / "fp32"
    result = subprocess.run([cpu_env()["PYTHON"], os.path.join(root, "zero_to_fp32.py"), root, str(out)],
                            cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, tail(result)
    files = list(out.iterdir())
    state = torch.load(files[0], weights_only=False) if files[0].suffix == ".bin" else None
    if state is None:
        from safetensors.torch import load_file
        state = load_file(str(files[0]))
    ours = _weights(reference_run)
    for key, value in ours.items():
        if value.is_floating_point() and f"image.{key}" in state and "running" not in key:
            assert torch.equal(state[f"image.{key}"].float(), value), key


def test_a_deepspeed_json_setting_what_the_yaml_owns_is_rejected_by_the_launcher(tmp_path):
    ds_json = tmp_path / "ds.json"
    ds_json.write_text('{"gradient_accumulation_steps": 4}')
    run_dir = str(tmp_path / "never")
    result = run(["bash", "launch/pretrain.sh", "configs/demo.yaml", "--deepspeed_config", str(ds_json),
                  f"run_dir={run_dir}"])
    assert result.returncode == 2, tail(result)
    assert "sets 'gradient_accumulation_steps', which the YAML owns: set optim.grad_accum instead" in result.stderr
    assert not os.path.exists(run_dir)


@pytest.mark.parametrize("script", ["pretrain", "finetune"])
def test_launchers_explain_themselves_with_help(script):
    result = run(["bash", f"launch/{script}.sh", "--help"])
    assert result.returncode == 0, tail(result)
    assert f"bash launch/{script}.sh [CONFIG.yaml] [key=value ...]" in result.stdout
    assert "Slurm" in result.stdout and "--deepspeed_config" in result.stdout and "torchrun" in result.stdout


def test_a_pdsh_launch_passes_one_resolved_config_not_overrides_a_remote_shell_would_expand(tmp_path):
    """HOSTFILE without NODE_RANK: DeepSpeed's runner starts the nodes through pdsh, whose remote
    shell re-parses the command line. Stand-ins for ssh and pdsh record what would run remotely."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text("#!/bin/sh\necho 127.0.0.1\n")
    (bin_dir / "pdsh").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/pdsh_args\n')
    for tool in ("ssh", "pdsh"):
        (bin_dir / tool).chmod(0o755)
    (tmp_path / "hostfile").write_text("nodeA slots=1\nnodeB slots=1\n")
    run_dir = tmp_path / "run"
    shards = "/data/laion/{000000..004095}.tar"
    env = cpu_env(PATH=f"{bin_dir}:{os.environ['PATH']}", HOSTFILE=tmp_path / "hostfile",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    result = subprocess.run(["bash", "launch/pretrain.sh", "configs/demo.yaml", f"run_dir={run_dir}",
                             f"data.train_sources.0.shards={shards}", "data.val_shards=/data/$HOME/val.tar"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, tail(result)
    pdsh_args = (tmp_path / "pdsh_args").read_text().splitlines()
    remote_command = " ".join(pdsh_args[pdsh_args.index("-w") + 2:])  # pdsh joins them for the remote shell
    resolved = run_dir / "launch_config.yaml"
    assert remote_command.endswith(f" internimage.pretrain.train {resolved}"), remote_command
    # What the remote shell parses: the config path and nothing else of ours.
    parsed = subprocess.run(["bash", "-c", f"printf '%s\\n' {remote_command.split('internimage.pretrain.train ')[1]}"],
                            capture_output=True, text=True).stdout.split()
    assert parsed == [str(resolved)]
    from internimage.pretrain.config import load_config
    cfg = load_config(str(resolved))
    assert cfg.data.train_sources[0].shards == shards and cfg.data.val_shards == "/data/$HOME/val.tar"


def test_an_override_given_twice_is_an_error_not_last_wins(tmp_path):
    result = run(["bash", "launch/pretrain.sh", "configs/demo.yaml", f"run_dir={tmp_path}/r", "optim.lr=1e-3",
                  "optim.lr=2e-3"])
    assert result.returncode == 2
    assert "'optim.lr' is given twice ('optim.lr=1e-3' and 'optim.lr=2e-3'): give it once." in result.stderr


def test_bad_config_key_is_rejected_before_any_process_starts(tmp_path):
    run_dir = str(tmp_path / "never")
    t0 = time.time()
    result = run(["bash", "launch/pretrain.sh", "configs/demo.yaml", f"run_dir={run_dir}", "optim.lrr=0.1"])
    assert result.returncode == 2
    assert "Did you mean 'lr'" in result.stderr
    assert not os.path.exists(run_dir) and time.time() - t0 < 30


# W&B (a test dependency, optional for users) logs offline here: no network, files in the run folder.
WANDB_OFFLINE = {"logging.wandb.enabled": "true", "logging.wandb.mode": "offline"} \
    if importlib.util.find_spec("wandb") else {}


def test_mixed_demo_trains_both_objectives_and_evaluates_zero_shot_and_retrieval(demo_data, tmp_path):
    run_dir = str(tmp_path / "mixed")
    overrides = _overrides(demo_data, run_dir, **{
        "data.train_sources.1.shards": f"{demo_data}/captions/train-{{000000..000003}}.tar",
        "data.val_caption_shards": f"{demo_data}/captions/val-000000.tar",
        "schedule.total_steps": 3, "checkpoint.every_steps": 0, "text.width": 16, "objective.embed_dim": 16,
        "data.context_length": 16, **WANDB_OFFLINE})
    result = run(deepspeed_cmd(2, "--module", "internimage.pretrain.train", "configs/demo_mixed.yaml", *overrides))
    assert result.returncode == 0, tail(result)
    train, evals = _train_metrics(run_dir)
    assert len(train) == 3
    for row in train:
        assert row["loss/supervised"] > 0 and row["loss/contrastive"] > 0
        assert row["loss/loss"] == pytest.approx(row["loss/supervised"] + row["loss/contrastive"], rel=1e-5)
    metrics = ["top1", "zeroshot_top1", "zeroshot_top5"] + [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    for name in metrics + [f"ema_{m}" for m in metrics]:
        assert 0.0 <= evals[-1][name] <= 1.0, name
    assert evals[-1]["zeroshot_samples"] == 2 * 16 * 2  # eval.max_batches × batch × ranks
    assert evals[-1]["retrieval_pairs"] == 360  # every caption pair, whatever max_batches
    assert "zeroshot_top1" in result.stdout and "t2i_r10" in result.stdout  # printed by rank 0
    # Once at start, rank 0 measured the first 1000 demo captions ("handwritten digit 1 (one)" and the
    # like), all longer than 16 byte-level tokens.
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        tokens = [row for row in map(json.loads, f) if row["kind"] == "tokens"]
    assert len(tokens) == 1 and tokens[0]["captions"] == 1000 and tokens[0]["mean_tokens"] > 16
    assert tokens[0]["truncated_share"] == 1.0  # every demo caption is longer than 14 bytes
    assert "cut at context_length=16; bytes tokenizer" in result.stdout
    if WANDB_OFFLINE:  # rank 0 sent the same scalars to an offline W&B run kept in the run folder
        with open(os.path.join(run_dir, "wandb_run.json")) as f:
            run_id = json.load(f)["id"]
        assert glob.glob(os.path.join(run_dir, "wandb", f"offline-run-*-{run_id}", f"run-{run_id}.wandb"))


def test_consecutive_non_finite_losses_stop_with_an_error_naming_the_step(demo_data, tmp_path):
    run_dir = str(tmp_path / "diverged")
    # An absurd LR makes the first update blow the weights up; every later loss is non-finite.
    result = run(_train_cmd(demo_data, run_dir, **{
        "optim.lr": 1e30, "schedule.warmup_steps": 0, "optim.grad_clip": 0,
        "schedule.max_nonfinite_steps": 3, "checkpoint.every_steps": 0}))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "non-finite loss in step 2: micro-batch skipped (1 in a row)" in output
    assert "3 consecutive non-finite losses in step 2" in output


def test_inf_in_one_gradient_skips_the_step_and_keeps_weights_ema_and_checkpoint_finite(demo_data, tmp_path):
    run_dir = str(tmp_path / "inf_gradient")
    cmd = deepspeed_cmd(2, "--module", "tests.pretrain.inf_gradient_run", "configs/demo.yaml",
                        *_overrides(demo_data, run_dir, **{"eval.at_end": "false"}))
    result = run(cmd, INF_AT_STEP=3)
    assert result.returncode == 0, tail(result)
    assert "non-finite gradient norm in step 3: step skipped (1 in a row)" in result.stdout + result.stderr
    train, _ = _train_metrics(run_dir)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))  # the skipped step was redone
    assert [r["skipped_steps"] for r in train] == [0, 0, 1, 1, 1, 1]
    assert all(r["grad_norm"] is not None and r["grad_norm"] < float("inf") for r in train)
    state = _state(run_dir)
    assert state["step"] == STEPS and state["skipped_steps"] == 1
    for ema in (False, True):
        weights = _weights(run_dir, ema=ema)
        assert all(torch.isfinite(v.float()).all() for v in weights.values()), f"ema={ema}"


def test_a_resumed_run_logs_each_step_once(reference_run, tmp_path):
    """Resuming rewinds the metrics too: what the interrupted run logged after the checkpoint it
    resumes from is dropped (JSON lines and TensorBoard), so every step appears once."""
    import shutil
    run_dir = str(tmp_path / "rewound")
    shutil.copytree(reference_run, run_dir)
    overrides = _resume_overrides(f"{run_dir}/checkpoints/step_00000004", run_dir, **{"eval.at_end": "false"})
    result = run(deepspeed_cmd(2, "--module", "internimage.pretrain.train", "configs/demo.yaml", *overrides))
    assert result.returncode == 0, tail(result)
    train, _ = _train_metrics(run_dir)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))


def test_a_compiled_run_resumes_an_eager_checkpoint_and_ends_on_the_same_weights(reference_run, tmp_path):
    """model.compile wraps nothing: a compiled run (ZeRO-3 gathering whole blocks) resumes the eager
    reference run's step 4 and ends where the uninterrupted run ended, loss for loss and weight for
    weight (raw and EMA): the AOTAutograd backend runs eager's ops, and gathering whole blocks
    changes when parameters are fetched, not what is computed."""
    import shutil
    run_dir = str(tmp_path / "compiled")
    shutil.copytree(reference_run, run_dir)
    shutil.rmtree(os.path.join(run_dir, "checkpoints", f"step_{STEPS:08d}"))
    overrides = _resume_overrides(f"{run_dir}/checkpoints/step_00000004", run_dir,
                                  **{"model.compile": "true", "model.compile_backend": "aot_eager"})
    result = run(deepspeed_cmd(2, "--module", "internimage.pretrain.train", "configs/demo.yaml", *overrides))
    assert result.returncode == 0, tail(result)
    assert "resumed from" in result.stdout + result.stderr
    assert _latest(run_dir) == f"step_{STEPS:08d}"
    ours, reference = _weights(run_dir), _weights(reference_run)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}
    train, evals = _train_metrics(run_dir)
    expected, _ = _train_metrics(reference_run)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1)) and evals
    assert [r["loss/loss"] for r in train] == [r["loss/loss"] for r in expected]
    _assert_same_weights(ours, reference)
    _assert_same_weights(_weights(run_dir, ema=True), _weights(reference_run, ema=True))
