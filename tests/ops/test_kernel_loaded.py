"""CI sets INTERNIMAGE_REQUIRE_FUSED_CPU=1: then a missing compiled CPU kernel is a failure, and
the op must refuse to fall back to the reference silently."""

import pytest
import torch

from internimage import ops
from internimage.ops import extension


@pytest.mark.skipif(not extension.require_fused_cpu(), reason="only when the CI demands the fused kernel")
def test_ci_has_the_compiled_cpu_kernel():
    assert extension.kernels_available("cpu"), (
        f"compiled CPU kernel did not load: {extension.load_error('cpu')}")
    module = extension.kernels_for(torch.device("cpu"))
    assert module is not None and module.__name__ == "internimage.ops._cpu"


def test_missing_kernel_warns_once_and_runs_the_reference(monkeypatch):
    monkeypatch.setitem(extension._loaded, "cpu", None)
    monkeypatch.setitem(extension._load_errors, "cpu", "ImportError: simulated")
    monkeypatch.setattr(extension, "_warned", set())
    monkeypatch.delenv(extension.REQUIRE_FUSED_CPU_ENV, raising=False)
    value, offset, mask = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 36), torch.rand(1, 4, 4, 18)
    with pytest.warns(RuntimeWarning, match="pure-PyTorch reference"):
        out = ops.dcnv3_core(value, offset, mask, groups=2)
    torch.testing.assert_close(out, ops.dcnv3_core_reference(value, offset, mask, groups=2))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.dcnv3_core(value, offset, mask, groups=2)  # second use: silent


def test_missing_kernel_is_an_error_when_ci_requires_it(monkeypatch):
    monkeypatch.setitem(extension._loaded, "cpu", None)
    monkeypatch.setitem(extension._load_errors, "cpu", "ImportError: simulated")
    monkeypatch.setenv(extension.REQUIRE_FUSED_CPU_ENV, "1")
    value, offset, mask = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 36), torch.rand(1, 4, 4, 18)
    with pytest.raises(RuntimeError, match="INTERNIMAGE_REQUIRE_FUSED_CPU"):
        ops.dcnv3_core(value, offset, mask, groups=2)
