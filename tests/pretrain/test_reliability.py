"""Checkpoint reliability in one process (no process group): what ``latest`` may be trusted for,
partial folders, and the completion marker. A stand-in engine writes DeepSpeed's part."""
import json
import os

import pytest
import torch

from internimage.pretrain import checkpoint as ckpt
from internimage.pretrain.state import Progress, RankState, RunState


class FakeEngine:
    """Writes one file where DeepSpeed writes its shards."""

    def save_checkpoint(self, root, tag, save_latest):
        os.makedirs(os.path.join(root, tag), exist_ok=True)
        torch.save({"w": torch.zeros(1)}, os.path.join(root, tag, "zero_pp_rank_0_mp_rank_00_model_states.pt"))


def _save(root, step, keep_last=3):
    run_state = RunState(Progress(step=step), world_size=1, total_steps=100, ema=False)
    return ckpt.save_checkpoint(FakeEngine(), root, run_state, RankState({}, {}), keep_last)


def _partial(root, step, legacy=False):
    """What a crash mid-save leaves: every file but the completion marker, and a stray one
    (``legacy``: a complete folder of a version without markers)."""
    tag_dir = os.path.join(root, ckpt.step_tag(step))
    os.makedirs(tag_dir)
    state = RunState(Progress(step=step), 1, 100, False).to_json()
    with open(os.path.join(tag_dir, "trainer_state.json"), "w") as f:
        json.dump(state if legacy else {**state, "format": ckpt.FORMAT}, f)
    torch.save({}, os.path.join(tag_dir, "rank_00000.pt"))
    open(os.path.join(tag_dir, "stray"), "w").close()


def _steps(root):
    return sorted(d for d in os.listdir(root) if d.startswith("step_"))


@pytest.mark.parametrize("latest", [None, "", "step_00000008"])
def test_lost_latest_resumes_from_the_newest_complete_checkpoint(tmp_path, capsys, latest):
    run_dir = str(tmp_path)
    root = ckpt.checkpoint_root(run_dir)
    for step in (2, 4):
        _save(root, step)
    _partial(root, 6)  # newer, but cut short
    if latest is None:
        os.remove(os.path.join(root, "latest"))
    else:
        with open(os.path.join(root, "latest"), "w") as f:
            f.write(latest)
    point = ckpt.resolve_resume("auto", run_dir)
    assert point is not None and point.tag == "step_00000004", "started from step 0 (or a partial one)"
    assert "warning" in capsys.readouterr().err
    assert ckpt.resolve_resume(root, run_dir).tag == "step_00000004"  # resume=PATH of the folder too


def test_no_complete_checkpoint_starts_fresh(tmp_path):
    root = ckpt.checkpoint_root(str(tmp_path))
    os.makedirs(root)
    _partial(root, 2)
    assert ckpt.resolve_resume("auto", str(tmp_path)) is None
    with pytest.raises(ckpt.ConfigError, match="incomplete"):
        ckpt.resolve_resume(os.path.join(root, "step_00000002"), str(tmp_path))


def test_partial_folder_is_cleaned_before_reuse_and_not_counted_by_keep_last(tmp_path):
    root = ckpt.checkpoint_root(str(tmp_path))
    for step in (2, 4):
        _save(root, step, keep_last=2)
    _partial(root, 6)
    _save(root, 6, keep_last=2)  # the same tag again, after a crash had left it partial
    assert not os.path.exists(os.path.join(root, "step_00000006", "stray"))
    assert os.path.isfile(os.path.join(root, "step_00000006", ckpt.COMPLETE))
    _partial(root, 7)  # a partial folder never displaces a complete one
    _save(root, 8, keep_last=2)
    assert _steps(root) == ["step_00000006", "step_00000008"]
    assert open(os.path.join(root, "latest")).read() == "step_00000008"


def test_checkpoints_written_before_markers_still_resume(tmp_path):
    root = ckpt.checkpoint_root(str(tmp_path))
    os.makedirs(root)
    _partial(root, 2, legacy=True)
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step_00000002")
    assert ckpt.resolve_resume("auto", str(tmp_path)).tag == "step_00000002"


# -- the trust boundary: rank files load with weights_only=True ------------------------------------
def _point_with_rank_file(tmp_path, payload):
    root = ckpt.checkpoint_root(str(tmp_path))
    tag_dir = os.path.join(root, "step_00000002")
    os.makedirs(tag_dir)
    torch.save(payload, os.path.join(tag_dir, "rank_00000.pt"))
    return ckpt.ResumePoint(root, "step_00000002", RunState(Progress(step=2), 1, 100, False))


class _RunsCode:
    """Unpickling this creates a folder: what a crafted checkpoint could do instead."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (self.path,)


def test_a_rank_file_that_would_run_code_is_refused(tmp_path):
    witness = str(tmp_path / "code_ran")
    point = _point_with_rank_file(tmp_path, {"loader": {}, "rng": {"x": _RunsCode(witness)}, "ema": None})
    with pytest.raises(RuntimeError, match="refusing to load"):
        ckpt._read_rank_state(point, 0)
    assert not os.path.exists(witness), "loading a rank file ran code"


def _rank_state(demo_data, random_state):
    from internimage.data import build_train_loader
    from internimage.pretrain.config import load_config
    cfg = load_config("configs/demo.yaml", [
        f"data.train_sources.0.shards={demo_data}/classes/train-{{000000..000003}}.tar",
        "data.batch_size=4", "data.workers=0"])
    loader = build_train_loader(cfg.data, 0, 1)
    next(iter(loader))
    return RankState(loader.state_dict(), random_state.state_dict(), {"shadow": {"w": torch.ones(2)}})


def _draws():
    import random
    import numpy as np
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(), random.random())


def test_rank_files_hold_only_tensors_and_plain_types_and_restore_every_stream(demo_data, tmp_path):
    import random
    import numpy as np
    from internimage.pretrain.state import RandomState
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    np.random.randn()  # numpy now holds a cached gaussian
    generator = torch.Generator()
    saved = _rank_state(demo_data, RandomState(generator))
    expected = _draws()
    point = _point_with_rank_file(tmp_path, saved.to_dict())
    torch.load(os.path.join(point.tag_dir, "rank_00000.pt"), weights_only=True)  # no numpy objects
    loaded = ckpt._read_rank_state(point, 0)
    assert loaded.loader == saved.loader
    RandomState(generator).load_state_dict(loaded.rng)
    assert _draws() == expected


def test_a_rank_file_of_the_previous_format_still_loads(tmp_path):
    import random
    import numpy as np
    from internimage.pretrain.state import RandomState
    np.random.seed(3)
    old_rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
               "device_generator": torch.Generator().get_state()}
    expected = _draws()
    point = _point_with_rank_file(tmp_path, {"loader": {"batches": 1}, "rng": old_rng, "ema": None})
    RandomState(torch.Generator()).load_state_dict(ckpt._read_rank_state(point, 0).rng)
    assert _draws() == expected


def test_a_step_saved_again_never_claims_completeness_while_it_is_rewritten(tmp_path, capsys):
    """A run resumed from step 2 saves step 4 again; it crashes in DeepSpeed's part of that save."""
    run_dir = str(tmp_path)
    root = ckpt.checkpoint_root(run_dir)
    for step in (2, 4):
        _save(root, step)

    class Crash(Exception):
        pass

    class CrashingEngine(FakeEngine):
        def save_checkpoint(self, root, tag, save_latest):
            super().save_checkpoint(root, tag, save_latest)
            raise Crash

    with pytest.raises(Crash):
        ckpt.save_checkpoint(CrashingEngine(), root, RunState(Progress(step=4), 1, 100, False), RankState({}, {}), 3)
    assert not os.path.exists(os.path.join(root, "step_00000004", ckpt.COMPLETE))
    assert ckpt.resolve_resume("auto", run_dir).tag == "step_00000002"


# -- the run folder's lock ---------------------------------------------------------------------------
def _write_lock(run_dir, **record):
    with open(os.path.join(run_dir, ".lock"), "w") as f:
        json.dump({"nonce": "old", **record}, f)


def test_a_lock_from_another_host_is_stale_only_when_nobody_holds_its_flock(tmp_path):
    import fcntl
    from internimage.pretrain.files import RunFolderLocked, RunLock
    run_dir = str(tmp_path)
    _write_lock(run_dir, host="other-node", pid=1, job="77")
    fd = os.open(os.path.join(run_dir, ".lock"), os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the holder on the other node is alive
    with pytest.raises(RunFolderLocked, match="host other-node, pid 1, job 77"):
        RunLock(run_dir).acquire()
    os.close(fd)  # ... and now it is dead
    lock = RunLock(run_dir)
    assert lock.acquire()["pid"] == os.getpid()
    assert RunLock.read(run_dir)["nonce"] == lock.info["nonce"]
    lock.release()
    assert not os.path.exists(os.path.join(run_dir, ".lock"))
