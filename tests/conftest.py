"""Markers of the whole suite. The fast part runs in a few minutes on 2 cores:

    python -m pytest -q tests -m "not multiprocess and not slow"

- ``multiprocess``: starts real processes that form a process group (DeepSpeed's launcher, 2 CPU
  ranks on gloo) — the end-to-end training, fine-tuning and ZeRO-3 checks.
- ``slow``: a single process, but a minute or more (the CUDA emulation's build and suite).
- ``gpu``: needs a CUDA device; skipped without one.
"""

MARKERS = {
    "multiprocess": "starts a real multi-process group (DeepSpeed launcher or torch.distributed)",
    "slow": "single-process, but takes a minute or more",
    "gpu": "needs a CUDA device (skipped without one)",
}


def pytest_configure(config):
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


def pytest_collection_modifyitems(config, items):
    import pytest
    import torch
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_gpu)
