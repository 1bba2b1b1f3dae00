"""Weights & Biases: rank 0 sends the scalars it writes to metrics.jsonl; a resumed run goes on in the
same W&B run (its id kept in the run folder) without sending steps W&B already has."""
import glob
import json
import os
import sys
import types

import pytest
import torch

from internimage.pretrain.config import WandbConfig
from internimage.pretrain.metrics import MetricsWriter


class FakeRun:
    def __init__(self, history_steps: int, **kwargs):
        self.kwargs, self.step, self.logged, self.config_updates, self.finished = kwargs, history_steps, [], [], False
        self.config = types.SimpleNamespace(update=lambda values, allow_val_change: self.config_updates.append(values))

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in wandb module; ``history_steps``: the step W&B's run is at when it is (re)opened."""
    module = types.ModuleType("wandb")
    module.runs, module.history_steps = [], 0
    module.init = lambda **kwargs: module.runs.append(FakeRun(module.history_steps, **kwargs)) or module.runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_scalars_are_forwarded_and_a_resumed_run_reopens_the_same_wandb_run(fake_wandb, tmp_path):
    run_dir = str(tmp_path / "h_laion")
    os.makedirs(run_dir)
    cfg = WandbConfig(enabled=True, project="p", entity="team", tags=["h"], mode="offline")
    writer = MetricsWriter(run_dir, True, False, wandb=cfg, config={"optim": {"lr": 1e-3}})
    writer.write(3, {"loss/loss": 1.5, "lr": torch.tensor(0.25), "note": "text", "nan": float("nan"), "none": None})
    writer.write(3, {"top1": 50.0}, kind="eval")
    writer.close()
    first = fake_wandb.runs[0]
    with open(os.path.join(run_dir, "wandb_run.json")) as f:
        run_id = json.load(f)["id"]
    assert first.kwargs == {"project": "p", "entity": "team", "group": None, "tags": ["h"], "name": "h_laion",
                            "mode": "offline", "dir": run_dir, "id": run_id, "resume": "allow"}
    assert first.config_updates == [{"optim": {"lr": 1e-3}}] and first.finished
    assert first.logged == [(3, {"train/loss/loss": 1.5, "train/lr": 0.25}), (3, {"eval/top1": 50.0})]

    # The interrupted run had sent steps up to 7; the checkpoint is at step 5: steps 6 and 7 come again.
    fake_wandb.history_steps = 8
    writer = MetricsWriter(run_dir, True, False, resumed_at=5, wandb=cfg)
    for step in (6, 7, 8):
        writer.write(step, {"loss/loss": float(step)})
    second = fake_wandb.runs[1]
    assert second.kwargs["id"] == run_id and second.kwargs["resume"] == "allow"
    assert second.logged == [(8, {"train/loss/loss": 8.0})]
    writer.close()


def test_other_ranks_and_disabled_wandb_start_no_run(fake_wandb, tmp_path):
    MetricsWriter(str(tmp_path), False, False, wandb=WandbConfig(enabled=True)).write(1, {"a": 1.0})
    MetricsWriter(str(tmp_path), True, False, wandb=WandbConfig(enabled=False)).write(1, {"a": 1.0})
    assert fake_wandb.runs == [] and not os.path.exists(tmp_path / "wandb_run.json")


def test_a_wandb_that_cannot_start_leaves_the_files_and_the_run_going(fake_wandb, tmp_path, capsys):
    def unreachable(**kwargs):
        raise ConnectionError("api.wandb.ai unreachable")
    fake_wandb.init = unreachable
    writer = MetricsWriter(str(tmp_path), True, False, wandb=WandbConfig(enabled=True))
    writer.write(1, {"loss/loss": 2.0})
    writer.close()
    assert "W&B could not start (ConnectionError: api.wandb.ai unreachable)" in capsys.readouterr().err
    with open(tmp_path / "metrics.jsonl") as f:
        assert json.loads(f.readline())["loss/loss"] == 2.0


def test_offline_wandb_writes_the_run_into_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = WandbConfig(enabled=True, project="internimage-test", mode="offline")
    ids = []
    for start in (0, 2):  # started, then resumed
        writer = MetricsWriter(str(tmp_path), True, False, resumed_at=start, wandb=cfg, config={"seed": 0})
        writer.write(start + 1, {"loss/loss": 1.0 / (start + 1)})
        ids.append(writer.wandb.id)
        writer.close()
    with open(tmp_path / "wandb_run.json") as f:
        run_id = json.load(f)["id"]
    # both starts are the same W&B run: `wandb sync RUN_DIR/wandb/offline-run-*` sends them to one
    assert ids == [run_id, run_id]
    assert glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
