"""Run-folder reliability with 2 real CPU ranks through the launcher: one job per run folder, one
folder shared by every rank."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from internimage.pretrain.files import RunLock
from tests.pretrain.pretrain_helpers import REPO, free_port, run, tail
from tests.pretrain.test_train_runs import _node_env, _overrides, _train_cmd

pytestmark = pytest.mark.multiprocess

SHORT = {"schedule.total_steps": 1, "eval.at_end": "false", "checkpoint.every_steps": 0}


def test_a_locked_run_dir_is_refused_on_every_rank_and_a_dead_jobs_lock_taken_over(demo_data, tmp_path):
    run_dir = str(tmp_path / "locked")
    os.makedirs(run_dir)
    holder = RunLock(run_dir)
    holder.acquire()  # a live job: this process
    cmd = _train_cmd(demo_data, run_dir, **SHORT)
    refused = run(cmd, timeout=120)
    output = refused.stdout + refused.stderr
    assert refused.returncode == 2, tail(refused)
    for rank in (0, 1):
        assert f"rank {rank}: refusing to start: run folder {run_dir} is in use by another job" in output, tail(refused)
    assert f"host {socket.gethostname()}, pid {os.getpid()}" in output
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))
    holder.release()

    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                  capture_output=True, text=True).stdout)
    with open(os.path.join(run_dir, ".lock"), "w") as f:  # what a killed job leaves
        json.dump({"host": socket.gethostname(), "pid": dead_pid, "job": "1234", "nonce": "x"}, f)
    result = run(cmd, timeout=180)
    assert result.returncode == 0, tail(result)
    assert f"taking over the stale lock of host {socket.gethostname()}, pid {dead_pid}, job 1234" in result.stdout
    assert not os.path.exists(os.path.join(run_dir, ".lock"))  # released at exit


def test_ranks_that_see_different_run_folders_refuse_to_start(demo_data, tmp_path):
    """Two nodes of one process whose run_dir is not the same folder (node-local disks)."""
    port = free_port()
    procs = [subprocess.Popen(["bash", "launch/pretrain.sh", "configs/demo.yaml",
                               *_overrides(demo_data, str(tmp_path / f"local_disk_{node}"), **SHORT)],
                              cwd=REPO, env=_node_env("node_rank", node, tmp_path, port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in range(2)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outputs[0][-3000:] + outputs[1][-3000:]
    for output in outputs:
        assert "is not one folder shared by every rank" in output and "node-local disk" in output, output[-3000:]
    assert not os.path.exists(tmp_path / "local_disk_1" / "checkpoints")


def test_universal_conversion_goes_into_the_resuming_run_and_an_interrupted_one_is_redone(demo_data, tmp_path):
    source = str(tmp_path / "two_ranks")
    result = run(_train_cmd(demo_data, source, **{"schedule.total_steps": 2, "eval.at_end": "false"}),
                 timeout=180)
    assert result.returncode == 0, tail(result)
    source_root = os.path.join(source, "checkpoints")
    run_dir = str(tmp_path / "one_rank")
    for root in (source_root, os.path.join(run_dir, "checkpoints")):  # an interrupted conversion's leftover
        os.makedirs(os.path.join(root, "step_00000002_universal", "zero"))
    before = sorted(os.listdir(source_root))
    overrides = _overrides(demo_data, run_dir, **{
        "schedule.total_steps": 3, "eval.at_end": "false", "checkpoint.every_steps": 0,
        "data.batch_size": 32, "resume": os.path.join(source_root, "step_00000002")})
    result = run(["bash", "launch/pretrain.sh", "configs/demo.yaml", *overrides], NPROC_PER_NODE=1,
                 MASTER_PORT=free_port(), timeout=240)
    assert result.returncode == 0, tail(result)
    assert "(world size 2 → 1, universal)" in result.stdout + result.stderr
    assert sorted(os.listdir(source_root)) == before  # nothing written into the source run
    assert not os.listdir(os.path.join(source_root, "step_00000002_universal", "zero"))
    root = os.path.join(run_dir, "checkpoints")
    assert open(os.path.join(root, "latest")).read() == "step_00000003"
    assert not [n for n in os.listdir(root) if "universal" in n]  # pruned once the run saved its own


def test_a_write_error_on_one_rank_stops_every_rank_in_bounded_time_with_latest_unchanged(demo_data, tmp_path):
    """Disk full on rank 1 while it writes step 4, on two nodes of one process each (separate
    launchers: nobody kills rank 0 when rank 1 dies; it must learn it)."""
    run_dir = str(tmp_path / "disk_full")
    port = free_port()
    overrides = _overrides(demo_data, run_dir, **{"schedule.total_steps": 4, "eval.at_end": "false",
                                                  "eval.every_steps": 0})
    procs = []
    for node in range(2):
        env = _node_env("node_rank", node, tmp_path, port)
        env["INTERNIMAGE_FAULT"] = "enospc:step_00000004:1"
        procs.append(subprocess.Popen(["bash", "launch/pretrain.sh", "configs/demo.yaml", *overrides], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    try:
        outputs = [p.communicate(timeout=150)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    assert [p.returncode for p in procs] == [4, 4], outputs[0][-3000:] + outputs[1][-3000:]
    path = os.path.join(run_dir, "checkpoints", "step_00000004", "rank_00001.pt")
    for output in outputs:
        assert "No space left on device (injected)" in output and path in output, output[-3000:]
        assert "latest still names step_00000002" in output
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read() == "step_00000002"


@pytest.mark.parametrize("failure", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_a_node_that_dies_makes_the_other_node_stop_in_bounded_time_naming_the_dead_rank(demo_data, tmp_path,
                                                                                        failure):
    """Two nodes of one rank each (two `--no_ssh` launchers); every process of node 1 is killed (its
    connections close: gloo fails at once, without saying which rank) or frozen (as a node that lost
    power or network: no connection closes, and the peers' next collective waits for the collective
    timeout, an hour by default, as NCCL's does either way). Node 0 stops within the heartbeat
    timeout, naming rank 1."""
    run_dir = str(tmp_path / "node_failure")
    port = free_port()
    overrides = _overrides(demo_data, run_dir, **{"schedule.total_steps": 500, "checkpoint.every_steps": 0,
                                                  "eval.at_end": "false", "deepspeed.heartbeat_timeout_seconds": 10})
    nodes = [subprocess.Popen(["bash", "launch/pretrain.sh", "configs/demo.yaml", *overrides], cwd=REPO,
                              env=_node_env("node_rank", node, tmp_path, port), start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in range(2)]
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + 180
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0) and time.time() < deadline:
        assert all(n.poll() is None for n in nodes), nodes[0].communicate()[0][-3000:]
        time.sleep(0.2)
    os.killpg(nodes[1].pid, failure)
    failed_at = time.time()
    try:
        output, _ = nodes[0].communicate(timeout=120)
    finally:
        os.killpg(nodes[1].pid, signal.SIGKILL)
        nodes[1].wait()
    waited = time.time() - failed_at
    assert nodes[0].returncode not in (0, None), output[-4000:]
    assert "rank 0: stopping: rank 1 (host " in output and "stopped answering" in output, output[-4000:]
    assert waited < 10 + 30, f"node 0 took {waited:.0f} s to stop"
