"""Fixtures shared by the CUDA kernel tests (on a GPU, and under the CPU emulation)."""
import pytest


@pytest.fixture(params=["atomic", "tiled"])
def scatter(request, monkeypatch):
    """Runs a test with each CUDA backward: the value gradient scattered with global atomics
    (default) or through a shared-memory window (INTERNIMAGE_DCNV3_CUDA_BACKWARD=tiled)."""
    monkeypatch.setenv("INTERNIMAGE_DCNV3_CUDA_BACKWARD", request.param)
    return request.param
