"""Which architectures an unset TORCH_CUDA_ARCH_LIST builds: the visible GPUs, PTX of the newest."""
import pytest

from internimage.ops.cuda_archs import default_arch_list


@pytest.mark.parametrize("visible, archs", [
    ([(9, 0)], "9.0+PTX"),                      # an H100/H200 node
    ([(8, 0), (9, 0), (9, 0)], "8.0;9.0+PTX"),  # mixed, repeated
    ([(10, 0)], "10.0+PTX"),                    # a B200 node
    ([], "8.0;9.0+PTX"),                        # a build node without GPUs: newer GPUs JIT the PTX
])
def test_the_visible_gpus_and_ptx_of_the_newest(visible, archs):
    assert default_arch_list(visible) == archs
