"""The ``--micro-batch max`` search of the training benchmark, against a fake device whose memory
runs out above a threshold (the search itself needs no DeepSpeed), and the release of each probe's
engine."""
import json
import math
import os
import subprocess
import sys

import pytest

from internimage.pretrain.benchmark import largest_fitting


class FakeDevice:
    """fits(n) is True up to ``threshold``; records every size tried."""

    def __init__(self, threshold: int):
        self.threshold = threshold
        self.tried: list[int] = []

    def __call__(self, micro_batch: int) -> bool:
        self.tried.append(micro_batch)
        return micro_batch <= self.threshold


THRESHOLDS = [1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 100, 127, 128, 129, 255, 256,
              257, 300, 511, 512, 513, 777, 1000, 1024, 1500, 2047, 2048, 3000]


@pytest.mark.parametrize("start", [1, 8, 32])
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_finds_a_fitting_size_within_an_eighth_of_the_largest(threshold, start):
    device = FakeDevice(threshold)
    found = largest_fitting(device, start=start, limit=4096)
    assert found in device.tried and found <= threshold
    assert threshold - found < max(1, found // 8)
    assert len(device.tried) == len(set(device.tried)), "a size was probed twice"


@pytest.mark.parametrize("threshold", [8, 16, 64, 256, 1024])
def test_exact_powers_of_two_are_found_exactly(threshold):
    assert largest_fitting(FakeDevice(threshold), start=8) == threshold


@pytest.mark.parametrize("threshold", [1, 2, 3, 5, 7])
def test_threshold_below_the_start_is_found_by_halving(threshold):
    device = FakeDevice(threshold)
    assert largest_fitting(device, start=8) == threshold
    assert device.tried[:2] == [8, 4]


def test_probes_stay_logarithmic():
    """Each probe builds an engine: doubling + bisection to 1/8 costs about log2(n) + 4 probes."""
    for threshold in THRESHOLDS:
        device = FakeDevice(threshold)
        largest_fitting(device, start=8, limit=4096)
        assert len(device.tried) <= math.log2(max(threshold, 8) / 8) + 2 + 4, (threshold, device.tried)


def test_nothing_fits_gives_zero_and_everything_fitting_stops_at_the_limit():
    assert largest_fitting(FakeDevice(0), start=8) == 0
    device = FakeDevice(10**9)
    assert largest_fitting(device, start=8, limit=1000) == 1000
    assert max(device.tried) == 1000


def test_start_outside_one_to_limit_is_refused():
    with pytest.raises(ValueError):
        largest_fitting(FakeDevice(8), start=0)
    with pytest.raises(ValueError):
        largest_fitting(FakeDevice(8), start=64, limit=32)


RELEASE_CHECK = r"""
import argparse, json, weakref
import torch
import internimage.pretrain.benchmark as bench
from internimage.pretrain.distributed import init_single_process
import internimage.pretrain.engine as engine_module

watched = []
build_engine = engine_module.build_engine

def out_of_memory(*_):
    raise torch.OutOfMemoryError("simulated: out of memory inside a block's forward")

def build_and_watch(cfg, module, world_size):
    engine, optimizer, gate = build_engine(cfg, module, world_size)
    if watched:  # the second engine runs out of memory half-way through the model
        module.image.levels[2].blocks[0].register_forward_pre_hook(out_of_memory)
    watched.extend(weakref.ref(x) for x in (module, engine, optimizer))
    return engine, optimizer, gate

engine_module.build_engine = build_and_watch
init_single_process()
args = argparse.Namespace(model="internimage_t", img_size=32, num_classes=10, steps=1, warmup=1,
                          zero_stage=3, precision="fp32", peak_tflops=None, dcn_reference=False)
results = [bench.bench_one(args, 2, True, None) for _ in range(2)]
print(json.dumps({"oom": [r.get("oom", False) for r in results],
                  "alive": [ref() is not None for ref in watched]}))
"""


@pytest.mark.multiprocess
def test_an_engine_is_freed_after_its_run_and_after_running_out_of_memory(tmp_path):
    """A probe's engine that outlived it would shrink every later probe of a max search. DeepSpeed
    keeps modules in a global stack, and an exception inside a forward leaves more there."""
    env = {**os.environ, "MASTER_PORT": str(29700 + os.getpid() % 200), "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", RELEASE_CHECK], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["oom"] == [False, True]
    assert report["alive"] == [False] * 6, "module, engine, optimizer of each run"
