"""Fused ops for GET's transformer blocks.

The functional entry points below are what models call. Until the Triton kernels land they run the
PyTorch reference (`kernels.reference`), so the model code never changes when they do.
"""

from kernels import reference
from kernels.reference import attention, bias_gelu, layer_norm

BACKENDS = ("torch", "triton")


def get_ops(backend: str):
    """The op namespace for a backend: an object with `attention`, `layer_norm` and `bias_gelu`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    return reference


__all__ = ["BACKENDS", "attention", "bias_gelu", "get_ops", "layer_norm", "reference"]
