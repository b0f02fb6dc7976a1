"""Bias add fused with the exact (erf) GELU, for the first MLP layer of a GET block.

    u = x + bias,   y = u * Phi(u) = 0.5 * u * (1 + erf(u / sqrt(2)))
    dx = dy * (Phi(u) + u * phi(u)),   phi(u) = exp(-u^2 / 2) / sqrt(2 pi),   dbias = sum_rows dx

The exact erf form matters: the tanh approximation would break parity with the official GET checkpoints. The
backward recomputes u from the saved x and bias (nothing is written into saved tensors, so IFT backward passes may
run it many times) and reduces dbias through per-program fp32 partial sums, deterministically.

References: Hendrycks and Gimpel, "Gaussian Error Linear Units" (arXiv 1606.08415); docs/KERNELS.md (fusion 1).
"""

import torch
import triton
import triton.language as tl

from .utils import check_inputs, empty, launcher, reduction_grid, register_op, warps_for

BLOCK_M = 16
BLOCK_D = 256


# ---------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _bias_gelu_fwd_kernel(
    X, Bias, Y, M, D, stride_xm, stride_xd,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = cols < D
    mask = (rows < M)[:, None] & mask_d[None, :]
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    u = x + tl.load(Bias + cols, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    y = 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))
    tl.store(Y + rows[:, None] * D + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    DY, X, Bias, DX, DB_partial, M, D, rows_per_program,
    stride_dym, stride_dyd, stride_xm, stride_xd,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = cols < D
    bias = tl.load(Bias + cols, mask=mask_d, other=0.0).to(tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & mask_d[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xd, mask=mask, other=0.0)
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyd, mask=mask, other=0.0)
        u = x.to(tl.float32) + bias[None, :]
        cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
        pdf = tl.math.exp(-0.5 * u * u) * 0.3989422804014327  # 1/sqrt(2 pi)
        dx = dy.to(tl.float32) * (cdf + u * pdf)
        tl.store(DX + rows[:, None] * D + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        db += dx  # masked entries are 0: dy loads as 0 there
    tl.store(DB_partial + pid * D + cols, tl.sum(db, 0), mask=mask_d)


# ---------------------------------------------------------------------------------------------------------------
# Launchers


def _check(op: str, x: torch.Tensor, bias: torch.Tensor) -> int:
    check_inputs(op, x=x, bias=bias)
    if x.dim() == 0 or bias.shape != (x.shape[-1],):
        raise ValueError(
            f"{op}: bias must have shape (D,) with D = x.shape[-1]; got x {tuple(x.shape)}, bias {tuple(bias.shape)}"
        )
    return x.shape[-1]


@register_op("bias_gelu_fwd")
def bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Forward launcher: gelu(x + bias) in x's shape and dtype (contiguous); x may have any strides."""
    D = _check("bias_gelu", x, bias)
    y = empty(x.shape, x.dtype, x.device)
    if y.numel() == 0:
        return y
    x2, bias = x.reshape(-1, D), bias.contiguous()  # (M, D); the bias is indexed densely
    M = x2.shape[0]
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(D, BLOCK_D))
    launcher(_bias_gelu_fwd_kernel)[grid](
        x2, bias, y, M, D, *x2.stride(), BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=warps_for(BLOCK_M * BLOCK_D)
    )
    return y


@register_op("bias_gelu_bwd")
def bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward launcher: returns dx (x's shape and dtype) and dbias (bias's dtype); dy may have any strides."""
    D = _check("bias_gelu backward", x, bias)
    check_inputs("bias_gelu backward", dy=dy, x=x)
    if dy.shape != x.shape:
        raise ValueError(f"bias_gelu backward: dy has shape {tuple(dy.shape)}, x has {tuple(x.shape)}")
    dx = empty(x.shape, x.dtype, x.device)
    x2, dy2, bias = x.reshape(-1, D), dy.reshape(-1, D), bias.contiguous()  # (M, D), (M, D), (D,)
    M = x2.shape[0]
    num_programs, rows_per_program = reduction_grid(M, BLOCK_M, x.device)
    db_partial = empty((num_programs, D), torch.float32, x.device)
    if M == 0 or D == 0:
        db_partial.zero_()
    else:
        launcher(_bias_gelu_bwd_kernel)[(num_programs, triton.cdiv(D, BLOCK_D))](
            dy2, x2, bias, dx, db_partial, M, D, rows_per_program, *dy2.stride(), *x2.stride(),
            BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=warps_for(BLOCK_M * BLOCK_D),
        )  # fmt: skip
    return dx, db_partial.sum(0).to(bias.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Autograd and functional entry point


class BiasGeluFunction(torch.autograd.Function):
    """Differentiable gelu(x + bias); saves x and bias (the pre-activation is recomputed in the backward)."""

    @staticmethod
    def forward(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return bias_gelu_fwd(x, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, bias = ctx.saved_tensors
        return bias_gelu_bwd(dy, x, bias)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU of x + bias, fused (Triton).

    Args:
        x: (..., D) float32, float16 or bfloat16, any strides (e.g. the fc1 output without its bias).
        bias: (D,), any of the three float dtypes; added in fp32.

    Returns:
        gelu(x + bias) in x's shape and dtype.

    Example:
        >>> h = torch.randn(8, 256, 2048, device="cuda", dtype=torch.bfloat16)
        >>> bias_gelu(h, torch.zeros(2048, device="cuda", dtype=torch.bfloat16)).shape
        torch.Size([8, 256, 2048])
    """
    return BiasGeluFunction.apply(x, bias)


__all__ = ["BiasGeluFunction", "bias_gelu", "bias_gelu_bwd", "bias_gelu_fwd"]
