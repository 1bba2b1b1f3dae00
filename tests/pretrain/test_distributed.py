"""The distributed module: collectives run on the device the process group serves.

Why this file exists: under NCCL (every GPU run) a collective on a CPU tensor raises "No backend
type associated with device type cpu", while gloo (this CPU suite) accepts it. The first GPU step
of the trainer failed that way because its control-plane all-reduces made CPU tensors. A process
group registered only for ``cuda`` (``init_process_group("cuda:gloo")``) reproduces NCCL's refusal
on a CPU machine; these tests pin down that every control-plane tensor is made on the group's
communication device and that no other module calls collectives at all.
"""
import ast
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from internimage.pretrain import distributed
from tests.pretrain.pretrain_helpers import REPO, cpu_env, free_port

PACKAGE_DIRS = ("model", "ops", "data", "pretrain")


def _run_in_fresh_process(code: str) -> str:
    """Runs ``code`` in a new interpreter (a process group is per process); returns its stdout."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env=cpu_env(MASTER_ADDR="127.0.0.1",
                                                                MASTER_PORT=free_port()))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_a_group_without_cpu_refuses_cpu_tensors_as_nccl_does():
    out = _run_in_fresh_process("""
        import torch, torch.distributed as dist
        dist.init_process_group("cuda:gloo", rank=0, world_size=1)
        try:
            dist.all_reduce(torch.tensor([1.0]))
            print("accepted")
        except RuntimeError as error:
            print("refused:", error)
        dist.destroy_process_group()
    """)
    assert "refused: No backend type associated with device type cpu" in out


@pytest.mark.parametrize("backend, expected", [("gloo", "cpu"), ("cuda:gloo", "cuda"),
                                               ("cpu:gloo,cuda:gloo", "cpu")])
def test_communication_device_is_what_the_group_serves(backend, expected):
    out = _run_in_fresh_process(f"""
        import torch.distributed as dist
        from internimage.pretrain.distributed import communication_device
        dist.init_process_group("{backend}", rank=0, world_size=1)
        print("device:", communication_device().type)
        dist.destroy_process_group()
    """)
    assert f"device: {expected}" in out


class _RecordedCollectives:
    """Stands in for the collectives of a 2-rank group and records the devices of their tensors."""

    def __init__(self):
        self.devices = []

    def all_reduce(self, tensor, op=None, group=None):
        self.devices.append(tensor.device.type)


def test_every_control_plane_tensor_is_made_on_the_communication_device(monkeypatch):
    recorded = _RecordedCollectives()
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "all_reduce", recorded.all_reduce)
    # "meta" stands for the GPU a CPU machine lacks: any tensor made elsewhere shows up as "cpu".
    monkeypatch.setattr(distributed, "communication_device", lambda: torch.device("meta"))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: [0.0] * self.numel())
    monkeypatch.setattr(torch.Tensor, "item", lambda self: 1.0)

    distributed.any_rank(True)
    distributed.all_ranks(False)
    distributed.all_ranks(torch.tensor(True))
    distributed.sum_over_ranks([1, 2, 3])
    distributed.mean_over_ranks({"loss": 1.5})
    distributed.Preemption().agreed()
    assert recorded.devices == ["meta"] * 6


def _collective_check(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results[rank] = {
        "any": distributed.any_rank(rank == 1),
        "all": distributed.all_ranks(rank == 1),
        "all_tensor": distributed.all_ranks(torch.tensor(True)),
        "sum": distributed.sum_over_ranks([rank, 10 * rank + 1]),
        "mean": distributed.mean_over_ranks({"loss": float(rank + 1), "aux": 2.0 * rank}),
        "gathered": distributed.gather_rows(torch.full((2, 3), float(rank))).tolist(),
    }
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_control_plane_results_over_two_ranks():
    results = mp.Manager().dict()
    mp.spawn(_collective_check, args=(2, free_port(), results), nprocs=2)
    for rank in (0, 1):
        r = results[rank]
        assert r["any"] is True and r["all"] is False and r["all_tensor"] is True
        assert r["sum"] == [1.0, 12.0]
        assert r["mean"] == {"loss": 1.5, "aux": 1.0}  # the logged loss is the mean over ranks
        assert r["gathered"] == [[0.0] * 3] * 2 + [[1.0] * 3] * 2


def _imports_torch_distributed(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            return True
        if isinstance(node, ast.ImportFrom) and node.module == "torch" and \
                any(a.name == "distributed" for a in node.names):
            return True
        if isinstance(node, ast.Attribute) and node.attr == "distributed" and \
                isinstance(node.value, ast.Name) and node.value.id == "torch":
            return True
    return False


def test_only_the_distributed_module_touches_torch_distributed():
    """One home: a collective written anywhere else could bypass the device rule above."""
    allowed = os.path.join("pretrain", "distributed.py")
    offenders = []
    for folder in PACKAGE_DIRS:
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(root, name)
                relative = os.path.relpath(path, REPO)
                with open(path) as f:
                    tree = ast.parse(f.read(), path)
                if relative != allowed and _imports_torch_distributed(tree):
                    offenders.append(relative)
    assert offenders == []
