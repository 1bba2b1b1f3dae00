"""Fixtures shared by the CUDA kernel tests (on a GPU, and under the CPU emulation)."""
import pytest

from internimage.ops import candidates

# Every forward and every backward candidate, paired so that each appears in at least one run of
# every test (a test runs a forward and a backward): as many runs as the longer list, not the product.
CANDIDATE_PAIRS = [(candidates.FORWARD[min(i, len(candidates.FORWARD) - 1)],
                    candidates.BACKWARD[min(i, len(candidates.BACKWARD) - 1)])
                   for i in range(max(len(candidates.FORWARD), len(candidates.BACKWARD)))]


@pytest.fixture(params=CANDIDATE_PAIRS, ids=[f"{f}+{b}" for f, b in CANDIDATE_PAIRS])
def scheme(request, monkeypatch):
    """(forward, backward) CUDA kernel candidates for one test run, also set as the override
    (INTERNIMAGE_DCNV3_CUDA_KERNELS) that ``dcnv3_core`` follows on a GPU."""
    forward, backward = request.param
    monkeypatch.setenv(candidates.OVERRIDE_ENV, f"forward={forward},backward={backward}")
    return request.param
