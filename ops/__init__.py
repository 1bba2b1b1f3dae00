"""The DCNv3 operator: ``dcnv3_core`` (dispatching to the fused kernels) and
``dcnv3_core_reference`` (the pure-PyTorch oracle); ``use_reference`` forces the latter."""
from .dcnv3 import BACKWARD_OP_NAME, OP_NAME, dcnv3_core
from .extension import kernels_available, use_reference
from .reference import dcnv3_core_reference

__all__ = ["BACKWARD_OP_NAME", "OP_NAME", "dcnv3_core", "dcnv3_core_reference", "kernels_available",
           "use_reference"]
