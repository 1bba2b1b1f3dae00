"""launch/slurm_pretrain.sbatch without Slurm: stand-in `srun` (one local process per task, with
SLURM_PROCID/LOCALID/NODEID, forwarding signals like srun) and `scontrol` (node names; requeue
recorded) on PATH. Checked: what each rank is started with, and that the job requeues itself
exactly when it was told its time limit is near (SIGUSR1 to the batch shell) and the ranks saved."""
import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from tests.pretrain.pretrain_helpers import PYTHON, REPO, cpu_env, free_port

SCRIPT = os.path.join(REPO, "launch", "slurm_pretrain.sbatch")

SRUN = f"""#!{PYTHON}
import json, os, signal, subprocess, sys
args = sys.argv[1:]
options = []
while args and args[0].startswith("-"):
    options.append(args.pop(0))
with open(os.path.join(os.environ["FAKE_SLURM_LOG"], "srun.json"), "w") as f:
    json.dump({{"options": options, "command": args}}, f)
per_node = int(os.environ["SLURM_NTASKS_PER_NODE"])
tasks = [subprocess.Popen(args, env=dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i % per_node),
                                         SLURM_NODEID=str(i // per_node)))
         for i in range(int(os.environ["SLURM_NTASKS"]))]
for signum in (signal.SIGUSR1, signal.SIGTERM):  # srun passes these on to every task
    signal.signal(signum, lambda s, f: [t.send_signal(s) for t in tasks])
codes = [t.wait() for t in tasks]
sys.exit(max(128 - c if c < 0 else c for c in codes))  # srun: the highest code, 128 + signal if killed
"""

SCONTROL = """#!/bin/sh
case "$1" in
  show) printf '%s\\n' $FAKE_HOSTNAMES ;;
  requeue) echo "$*" >> "$FAKE_SLURM_LOG/requeue.log" ;;
esac
"""

# Stands in for the interpreter: the config check runs in the real one; a rank records what it got,
# then finishes, fails, or waits for a signal and exits 0 like the trainer after its checkpoint.
FAKE_PYTHON = f"""#!{PYTHON}
import json, os, signal, sys, time
if sys.argv[1:3] != ["-m", "internimage.pretrain.train"]:
    os.execv({PYTHON!r}, [{PYTHON!r}] + sys.argv[1:])
log, rank, mode = os.environ["FAKE_SLURM_LOG"], os.environ["RANK"], os.environ["FAKE_RANK_MODE"]
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
def signalled(signum, frame):
    open(os.path.join(log, f"signal_{{rank}}"), "w").write(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGUSR1, signalled)
signal.signal(signal.SIGTERM, signalled)
with open(os.path.join(log, f"rank_{{rank}}.json"), "w") as f:
    json.dump({{"argv": sys.argv[3:], "env": {{k: os.environ.get(k) for k in keys}}}}, f)
if mode == "fail" and rank == "1":
    sys.exit(3)
while mode == "wait":
    time.sleep(0.05)
"""


def _tools(tmp_path, fake_ranks: bool) -> dict:
    bin_dir, log = tmp_path / "bin", tmp_path / "slurm_log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("fake_python", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = cpu_env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SLURM_LOG=log, FAKE_HOSTNAMES="node7 node8",
                  SLURM_JOB_ID=4242, SLURM_SUBMIT_DIR=REPO, SLURM_JOB_NODELIST="node[7-8]",
                  SLURM_JOB_NUM_NODES=2, SLURM_NTASKS=4, SLURM_NTASKS_PER_NODE=2, SLURM_CPUS_PER_TASK=3)
    env.pop("OMP_NUM_THREADS")
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):  # an earlier test's
        env.pop(key, None)
    if fake_ranks:
        env["PYTHON"] = str(bin_dir / "fake_python")
    return env


def _start(env, *args):
    return subprocess.Popen(["bash", SCRIPT, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(condition, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def _finish(proc, timeout=300) -> str:
    """The job's output once it ended; one still running after ``timeout`` s is killed with every
    process it started, and the test fails with its output."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        pytest.fail(f"the job did not end in {timeout} s:\n{proc.communicate()[0][-4000:]}")


def _requeues(env):
    path = os.path.join(env["FAKE_SLURM_LOG"], "requeue.log")
    return open(path).read().splitlines() if os.path.exists(path) else []


OVERRIDES = ['data.train_sources.0.shards=/d/train-{000000..000003}.tar', "run_dir=/tmp/$HOME x"]


@pytest.mark.parametrize("mode, signum, restarts, code, requeued", [
    ("finish", None, 0, 0, False),                  # the run ended: done
    ("wait", signal.SIGUSR1, 0, 0, True),           # time limit near: checkpoint, requeue
    ("wait", signal.SIGUSR1, 100, 0, False),        # ... unless requeued MAX_RESTARTS times already
    ("wait", signal.SIGTERM, 0, 0, False),          # cancelled: checkpoint, stop
    ("fail", None, 0, 3, False),                    # a rank failed: its code, no requeue
])
def test_each_rank_gets_its_place_and_the_job_requeues_only_when_preempted(tmp_path, mode, signum, restarts,
                                                                           code, requeued):
    env = _tools(tmp_path, fake_ranks=True)
    env.update(FAKE_RANK_MODE=mode, SLURM_RESTART_COUNT=str(restarts))
    proc = _start(env, "configs/demo.yaml", *OVERRIDES)
    log = env["FAKE_SLURM_LOG"]
    if signum is not None:
        if _wait_for(lambda: all(os.path.exists(os.path.join(log, f"rank_{r}.json")) for r in range(4)), proc):
            time.sleep(0.3)  # the ranks are in their wait loop, handlers installed
            proc.send_signal(signum)  # to the batch shell only, as --signal=B:USR1 does
    output = _finish(proc)
    assert proc.returncode == code, output
    assert _requeues(env) == (["requeue 4242"] if requeued else []), output
    with open(os.path.join(log, "srun.json")) as f:
        srun = json.load(f)
    assert srun["options"] == ["--kill-on-bad-exit=1"] and srun["command"][:2] == ["bash", "-c"]
    for rank in range(4):
        with open(os.path.join(log, f"rank_{rank}.json")) as f:
            got = json.load(f)
        assert got["argv"] == ["configs/demo.yaml", *OVERRIDES]  # no shell expanded braces or $HOME
        assert got["env"] == {"RANK": str(rank), "LOCAL_RANK": str(rank % 2), "WORLD_SIZE": "4",
                              "MASTER_ADDR": "node7", "MASTER_PORT": str(20000 + 4242), "OMP_NUM_THREADS": "3"}
        if signum is not None:  # passed on to every rank through srun
            assert open(os.path.join(log, f"signal_{rank}")).read() == signum.name


def test_a_config_error_or_a_run_outside_slurm_starts_no_rank(tmp_path):
    env = _tools(tmp_path, fake_ranks=True)
    result = subprocess.run(["bash", SCRIPT, "configs/demo.yaml", "optim.lrr=1"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Did you mean 'lr'" in result.stderr
    env.pop("SLURM_JOB_ID")
    result = subprocess.run(["bash", SCRIPT, "configs/demo.yaml"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "submit it with sbatch" in result.stderr
    assert not os.path.exists(os.path.join(env["FAKE_SLURM_LOG"], "srun.json")) and not _requeues(env)


def test_the_script_is_valid_bash_explains_itself_and_asks_slurm_for_the_signal_and_requeue():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
    usage = subprocess.run(["bash", SCRIPT, "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "sbatch --nodes=4 launch/slurm_pretrain.sbatch CONFIG.yaml" in usage.stdout
    with open(SCRIPT) as f:
        directives = [line.split()[1] for line in f if line.startswith("#SBATCH")]
    assert {"--signal=B:USR1@600", "--requeue", "--open-mode=append"} <= set(directives)


@pytest.mark.multiprocess
def test_real_ranks_checkpoint_on_the_time_limit_signal_and_the_job_requeues(demo_data, tmp_path):
    env = _tools(tmp_path, fake_ranks=False)
    env.update(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", MASTER_PORT=str(free_port()), FAKE_HOSTNAMES="127.0.0.1")
    run_dir = tmp_path / "run"
    proc = _start(env, "configs/demo.yaml", f"run_dir={run_dir}",
                  f"data.train_sources.0.shards={demo_data}/classes/train-{{000000..000003}}.tar",
                  f"data.val_shards={demo_data}/classes/val-000000.tar", "data.batch_size=16",
                  "model.arch={channels: 8, depths: [1, 1, 1, 1], groups: [1, 1, 2, 2]}",
                  "data.workers=0", "schedule.total_steps=500", "checkpoint.every_steps=0", "logging.every_steps=1",
                  "logging.progress_bar=false")
    metrics = run_dir / "metrics.jsonl"
    if _wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, proc, timeout=300):
        proc.send_signal(signal.SIGUSR1)
    output = _finish(proc)
    assert proc.returncode == 0, output[-4000:]
    assert "preempted: checkpoint saved" in output and _requeues(env) == ["requeue 4242"], output[-4000:]
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    with open(run_dir / "checkpoints" / tag / "trainer_state.json") as f:
        assert 1 <= json.load(f)["step"] < 500
