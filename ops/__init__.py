"""The DCNv3 operator: ``dcnv3_core`` (dispatching) and ``dcnv3_core_reference`` (the oracle)."""
from .dcnv3 import OP_NAME, dcnv3_core
from .reference import dcnv3_core_reference

__all__ = ["OP_NAME", "dcnv3_core", "dcnv3_core_reference"]
