"""Pure-PyTorch implementations of the fused ops: the `backend="torch"` path and the tests' reference.

Each function has the same signature and semantics as its Triton counterpart in this package.
"""

import torch
import torch.nn.functional as F


def attention(qkv: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Bidirectional multi-head attention read from a packed QKV projection.

    Args:
        qkv: (B, N, 3, H, d): the fused qkv projection output viewed as q, k, v and heads.
        scale: softmax scale; default 1/sqrt(d).

    Returns:
        (B, N, H*d): the heads concatenated in head order.
    """
    B, N, three, H, d = qkv.shape
    if three != 3:
        raise ValueError(f"attention: qkv must have shape (B, N, 3, H, d), got {tuple(qkv.shape)}")
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, d)
    o = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (B, H, N, d)
    return o.transpose(1, 2).reshape(B, N, H * d)


def layer_norm(x, weight, bias, eps: float = 1e-6, residual=None):
    """LayerNorm over the last dim, optionally after a residual add.

    Returns LN(x) when residual is None, else (LN(x + residual), x + residual).
    """
    if residual is not None:
        x = x + residual
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps), x
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU of x + bias; bias broadcasts over the last dim; the result has x's dtype.

    The bias is cast to x's dtype first, so under autocast (bf16 fc1 output, fp32 bias) the wide hidden activation
    stays in bf16, as the Triton op keeps it.
    """
    return F.gelu(x + bias.to(x.dtype))
