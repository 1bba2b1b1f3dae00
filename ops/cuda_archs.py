"""The GPU architectures the CUDA kernels are built for when ``TORCH_CUDA_ARCH_LIST`` is not set.

As torch itself chooses: the GPUs this machine sees, with PTX of the newest, which newer GPUs
compile at load time, so a Blackwell node never meets "no kernel image is available for the
device". A build node without GPUs builds for the data-center generations the kernels are tuned for
(A100, H100/H200), again with PTX of the newest. Read by ``setup.py`` (by file path: the package is
not installed yet when it runs).
"""
from __future__ import annotations

from typing import Iterable

WITHOUT_VISIBLE_GPUS = ((8, 0), (9, 0))


def default_arch_list(visible_capabilities: Iterable[tuple[int, int]]) -> str:
    """``TORCH_CUDA_ARCH_LIST`` for GPUs of these compute capabilities, e.g. [(9, 0)] → "9.0+PTX"."""
    capabilities = sorted(set(visible_capabilities)) or list(WITHOUT_VISIBLE_GPUS)
    archs = [f"{major}.{minor}" for major, minor in capabilities]
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])
