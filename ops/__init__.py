"""The DCNv3 operator: ``dcnv3_core`` and ``dcnv3_core_packed`` (offsets and mask in one tensor),
dispatching to the fused kernels, and ``dcnv3_core_reference`` (the pure-PyTorch oracle);
``use_reference`` forces the latter."""
from .dcnv3 import (BACKWARD_OP_NAME, OP_NAME, dcnv3_core, dcnv3_core_packed, pack_offset_mask,
                    split_offset_mask)
from .extension import kernels_available, use_reference
from .reference import dcnv3_core_reference

__all__ = ["BACKWARD_OP_NAME", "OP_NAME", "dcnv3_core", "dcnv3_core_packed", "dcnv3_core_reference",
           "kernels_available", "pack_offset_mask", "split_offset_mask", "use_reference"]
