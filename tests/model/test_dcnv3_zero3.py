"""DCNv3 blocks under ZeRO-3 with every parameter partitioned (the pretraining tests' tiny models stay
below DeepSpeed's persistence threshold, so nothing there is released between steps): gradients
equal a plain model's (tests/model/zero3_dcnv3_check.py, one CPU rank)."""
import json
import os
import socket
import subprocess
import sys

import pytest

from tests.paths import REPO

pytestmark = pytest.mark.multiprocess  # a DeepSpeed process group (one rank, gloo) in a subprocess


def test_zero3_gradients_equal_a_plain_model_with_every_parameter_partitioned():
    pytest.importorskip("deepspeed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "tests.model.zero3_dcnv3_check", str(port)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, output[-6000:]
    for case, numbers in json.loads(lines[-1][len("RESULT "):]).items():
        assert numbers["partitioned"], case  # released between steps: only the gather can feed the GEMM
        assert numbers["max_grad_diff"] < 1e-6, (case, numbers)
