"""Fused ops for GET's transformer blocks, in two interchangeable backends.

- ``'torch'``: `get_kernels.reference`, plain PyTorch (SDPA, F.layer_norm, F.gelu); runs anywhere.
- ``'triton'``: the Triton kernels of `get_kernels.attention`, `get_kernels.layer_norm` and `get_kernels.gelu`;
  CUDA tensors, or CPU tensors in the Triton interpreter when TRITON_INTERPRET=1 was set before triton was imported
  (slow; tests).

The folder is ``kernels/`` in the repository but installs under the import name ``get_kernels`` (pyproject.toml):
PyPI's widely installed ``kernels`` package would otherwise share one folder with it (docs/KERNELS.md). Modules of
this package import each other relatively, so the folder works under that name.

Both expose the same three functions with the same semantics:
``attention(qkv, scale=None)``, ``layer_norm(x, weight, bias, eps=1e-6, residual=None)`` and ``bias_gelu(x, bias)``.
Models pick one namespace with `get_ops(backend)`; the op modules themselves are imported only then, so importing
this package never needs triton.

Example:
    >>> ops = get_ops(default_backend("cpu"))
    >>> ops.attention(torch.randn(2, 16, 3, 4, 32)).shape
    torch.Size([2, 16, 128])
"""

import functools
import types

import torch

from . import reference

BACKENDS = ("torch", "triton")


@functools.cache
def triton_available() -> bool:
    """Whether the triton package imports here."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def default_backend(device: torch.device | str) -> str:
    """'triton' for a CUDA device when triton is importable, else 'torch'."""
    return "triton" if torch.device(device).type == "cuda" and triton_available() else "torch"


@functools.cache
def _triton_ops() -> types.SimpleNamespace:
    from .attention import attention
    from .gelu import bias_gelu
    from .layer_norm import layer_norm

    return types.SimpleNamespace(attention=attention, layer_norm=layer_norm, bias_gelu=bias_gelu)


def get_ops(backend: str):
    """The op namespace of a backend: an object with `attention`, `layer_norm` and `bias_gelu`.

    Args:
        backend: 'torch' (get_kernels.reference) or 'triton' (the Triton kernels).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    if backend == "torch":
        return reference
    if not triton_available():
        raise RuntimeError("kernel backend 'triton' needs the triton package, which does not import here; "
                           "install triton or use backend='torch'")  # fmt: skip
    return _triton_ops()


__all__ = ["BACKENDS", "default_backend", "get_ops", "reference", "triton_available"]
