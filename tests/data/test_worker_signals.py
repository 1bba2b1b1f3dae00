"""Loader workers and the job's stop signals: a signal sent to every process of a job (Slurm, the
deepspeed launcher) is the rank's to act on; the rank itself still ends its workers."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from internimage.data import SourceConfig, build_train_loader

from tests.data.data_cases import small_config, take, write_class_shards
from tests.paths import REPO


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_class_shards(str(tmp_path_factory.mktemp("signals")), shards=4, per_shard=6)


def _workers_started_by(process: psutil.Process, before: set[int]) -> list[psutil.Process]:
    return [p for p in process.children() if p.pid not in before]


def test_stop_signals_from_outside_the_rank_leave_its_workers_serving(shards):
    """What `kill -TERM -PGID`, scancel or terminate_process_tree does to the workers: sent by
    another process (here `kill`), so the workers keep serving batches."""
    loader = build_train_loader(small_config([SourceConfig("c", shards, kind="class")], workers=2), 0, 1)
    before = {p.pid for p in psutil.Process().children()}
    take(loader, 2)  # the workers are up
    workers = _workers_started_by(psutil.Process(), before)
    assert len(workers) == 2
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        for worker in workers:
            subprocess.run(["kill", f"-{signum.name[3:]}", str(worker.pid)], check=True)
    time.sleep(0.5)
    assert len(take(loader, 8)) == 8
    assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


RANK_THAT_EXITS = textwrap.dedent("""
    import sys
    from internimage.data import SourceConfig, build_train_loader
    from tests.data.data_cases import small_config, take
    loader = build_train_loader(small_config([SourceConfig("c", sys.argv[1], kind="class")], workers=2), 0, 1)
    take(loader, 2)
    print("serving", flush=True)
    sys.stdin.readline()  # the workers stay up, mid-stream, until the test says
""")


def test_a_rank_that_exits_mid_stream_still_ends_its_workers(shards):
    """The DataLoader and Python's exit end workers with the rank's own SIGTERM: it must still
    work, or every rank would hang at exit waiting for workers that ignore it."""
    rank = subprocess.Popen([sys.executable, "-c", RANK_THAT_EXITS, shards], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert rank.stdout.readline().strip() == "serving"
    workers = psutil.Process(rank.pid).children()
    assert len(workers) == 2
    rank.stdin.close()
    assert rank.wait(timeout=60) == 0
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"workers left behind: {alive}"


def test_a_worker_whose_rank_died_leaves_on_the_next_signal(shards):
    rank = subprocess.Popen([sys.executable, "-c", RANK_THAT_EXITS, shards], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert rank.stdout.readline().strip() == "serving"
    workers = psutil.Process(rank.pid).children()
    os.kill(rank.pid, signal.SIGKILL)
    rank.wait()
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive


def test_a_worker_stuck_in_a_read_stops_the_rank_with_an_error_naming_the_timeout(tmp_path):
    """A shard whose read never returns and no read timeout covers (here a pipe: command that sleeps,
    with read_timeout_s far longer): the rank stops after data.batch_timeout_s, not never."""
    cfg = small_config([SourceConfig("c", "pipe:sleep 599.25", kind="class")], workers=1,
                       read_timeout_s=3600, batch_timeout_s=3, epoch_samples=100)
    loader = build_train_loader(cfg, 0, 1)
    started = time.time()
    with pytest.raises(TimeoutError, match=r"no batch from the data loader workers for 3 s \(data.batch_timeout_s\)"):
        next(iter(loader))
    assert time.time() - started < 30
    loader.close()  # the stuck worker is stopped, and the command it started with it
    deadline = time.time() + 20
    while time.time() < deadline and _commands_running("sleep 599.25"):
        time.sleep(0.2)
    assert not _commands_running("sleep 599.25")


def _commands_running(text: str) -> list:
    return [p for p in psutil.process_iter(["cmdline"]) if text in " ".join(p.info["cmdline"] or [])]
