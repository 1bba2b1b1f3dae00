"""Finds the compiled DCNv3 kernels and says which implementation serves a device.

``setup.py`` builds ``internimage.ops._cpu`` (C++) and, where torch has CUDA and nvcc exists,
``internimage.ops._cuda``. An install without a compiler has neither; the op then runs the
pure-PyTorch reference and says so once. ``INTERNIMAGE_REQUIRE_FUSED_CPU=1`` (set by CI) turns a
missing CPU kernel into an error instead, so CI cannot silently test the fallback.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from types import ModuleType
from typing import Iterator

import torch

REQUIRE_FUSED_CPU_ENV = "INTERNIMAGE_REQUIRE_FUSED_CPU"
_MODULES = {"cpu": "internimage.ops._cpu", "cuda": "internimage.ops._cuda"}
_loaded: dict[str, ModuleType | None] = {}
_load_errors: dict[str, str] = {}
_warned: set[str] = set()
_state = threading.local()


def _load(kind: str) -> ModuleType | None:
    if kind not in _loaded:
        try:
            _loaded[kind] = importlib.import_module(_MODULES[kind])
        except (ImportError, OSError) as error:  # not built, or built against another torch
            _loaded[kind] = None
            _load_errors[kind] = f"{type(error).__name__}: {error}"
    return _loaded[kind]


def kernels_available(kind: str) -> bool:
    """Whether the compiled kernels for ``kind`` ("cpu" or "cuda") import."""
    return _load(kind) is not None


def load_error(kind: str) -> str | None:
    """Why the compiled kernels for ``kind`` did not import (None when they did)."""
    _load(kind)
    return _load_errors.get(kind)


def require_fused_cpu() -> bool:
    return os.environ.get(REQUIRE_FUSED_CPU_ENV, "") not in ("", "0")


@contextlib.contextmanager
def use_reference(enabled: bool = True) -> Iterator[None]:
    """Within this block (this thread), ``dcnv3_core`` runs the pure-PyTorch reference.

    For comparing whole models fused vs reference, and for timing the reference.
    """
    previous = getattr(_state, "force_reference", False)
    _state.force_reference = enabled
    try:
        yield
    finally:
        _state.force_reference = previous


def kernels_for(device: torch.device) -> ModuleType | None:
    """The compiled module serving ``device``, or None when the reference must run there.

    Warns once per device type when no kernel is built; raises when CI demanded the CPU kernel.
    """
    if getattr(_state, "force_reference", False):
        return None
    kind = device.type
    if kind not in _MODULES:
        return None
    module = _load(kind)
    if module is None:
        if kind == "cpu" and require_fused_cpu():
            raise RuntimeError(f"{REQUIRE_FUSED_CPU_ENV} is set but the fused CPU DCNv3 kernel did not "
                               f"load ({_load_errors['cpu']}); rebuild with "
                               f"`pip install --no-build-isolation -e .` on a machine with a C++ compiler")
        if kind not in _warned:
            _warned.add(kind)
            warnings.warn(f"internimage.ops: no compiled DCNv3 kernel for {kind} "
                          f"({_load_errors[kind]}); running the slow pure-PyTorch reference. "
                          f"Reinstall with a C++ compiler (and nvcc for CUDA) to build it.",
                          RuntimeWarning, stacklevel=3)
    return module
