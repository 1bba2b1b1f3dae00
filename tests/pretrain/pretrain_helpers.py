"""Helpers for tests that start real DeepSpeed processes (2 CPU ranks, gloo)."""
import os
import subprocess
import sys

from tests.paths import REPO

PYTHON = sys.executable


def cpu_env(**extra) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHON=PYTHON,
               PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_cmd(nproc: int, *args: str, port: int | None = None) -> list[str]:
    return [PYTHON, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
            str(port or free_port()), "--no_local_rank", *args]


def run(cmd, timeout=240, **env) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=cpu_env(**env), capture_output=True, text=True,
                            timeout=timeout)
    return result


def tail(result) -> str:
    return (result.stdout + result.stderr)[-6000:]
