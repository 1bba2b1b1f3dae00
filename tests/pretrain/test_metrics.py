"""MFU needs the device's peak: the names torch.cuda.get_device_name() reports map to their dense
bf16 tensor-core peak (no sparsity); an unknown device gives None, so MFU is left out, not wrong."""
import pytest

from internimage.pretrain.metrics import peak_tflops_of


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989.4),
    ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA H20", 148.0),
    ("NVIDIA H100 80GB HBM3", 989.4),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA GH200 480GB", 989.4),
    ("NVIDIA B200", 2250.0),
    ("NVIDIA GB200", 2500.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA L40S", 362.1),
    ("NVIDIA L40", 181.0),
    ("NVIDIA L4", 121.0),
])
def test_peak_of_each_datacenter_gpu(name, peak):
    assert peak_tflops_of(name) == peak


def test_unknown_device_has_no_peak():
    assert peak_tflops_of("NVIDIA GeForce GTX 1080") is None
