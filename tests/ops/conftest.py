"""Fixtures shared by the CUDA kernel tests (on a GPU, and under the CPU emulation)."""
import pytest


@pytest.fixture(params=["untiled", "tiled"])
def scheme(request, monkeypatch):
    """Runs a test with each set of CUDA kernels: the default untiled ones and the tiled ones
    that go through shared-memory windows (INTERNIMAGE_DCNV3_CUDA_TILED=1)."""
    monkeypatch.setenv("INTERNIMAGE_DCNV3_CUDA_TILED", "1" if request.param == "tiled" else "0")
    return request.param
