"""The CUDA binding and kernels (``ops/csrc/dcnv3_cuda.cu``) built as plain C++ whose kernels run on
CPU tensors under the CUDA emulation (``ops/csrc/cuda_emulation.h``: every CUDA thread a fiber,
real barriers and warp shuffles). For tests and for the bench on machines without a GPU; it shows
correctness, not speed. Needs a C++ compiler; the build takes about 45 s, once per process.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from types import ModuleType

CSRC = Path(__file__).resolve().parent / "csrc"
_built: dict[str, ModuleType] = {}


def load_emulated_kernels(build_directory: str | None = None) -> ModuleType:
    """The emulated ``internimage.ops._cuda``: the same ``forward``/``backward`` on CPU tensors,
    plus ``take_atomic_counts``. Built on first use (in ``build_directory``, default a fresh
    temporary folder), then shared by every caller in this process."""
    if "module" not in _built:
        from torch.utils import cpp_extension
        folder = build_directory or tempfile.mkdtemp(prefix="dcnv3_cuda_emulation_")
        _built["module"] = cpp_extension.load(
            name="dcnv3_cuda_emulated", sources=[str(CSRC / "dcnv3_cuda_emulated.cpp")],
            extra_include_paths=[str(CSRC)], extra_cflags=["-O2", "-fno-strict-aliasing"],
            build_directory=folder)
    return _built["module"]
