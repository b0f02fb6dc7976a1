"""LayerNorm over the last dim with affine weight and bias, optionally fused with the residual add before it.

    s = x + residual                    (when a residual is given; s is also returned: it is the block's new stream)
    y = (s - mean) * rstd * weight + bias,   mean, rstd = 1 / sqrt(var + eps) in fp32

Backward, with x_hat = (s - mean) * rstd and g = dy * weight:
    ds = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) + d(s output)
    dweight = sum_rows dy * x_hat,   dbias = sum_rows dy

The forward works on tiles of whole rows. The backward runs a persistent grid: each program owns a contiguous range
of rows and writes its fp32 partial dweight/dbias to its own row of a buffer, which is summed afterwards, so the
result is deterministic (no atomics) and bit-stable across runs.

References: Ba et al., "Layer Normalization" (arXiv 1607.06450); docs/KERNELS.md (fusion 4).
"""

import torch
import triton
import triton.language as tl

from .utils import (
    check_inputs,
    empty,
    launcher,
    pow2_at_least,
    reduction_grid,
    register_op,
    row_block,
    warps_for,
)

MAX_DIM = 8192  # a whole row per tile, in registers (16384 spills in the backward on sm_90)


# ---------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _layer_norm_fwd_kernel(
    X, R, W, B, Y, S, Mean, Rstd, M, D, eps,
    stride_xm, stride_xd, stride_rm, stride_rd,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    mask = (rows < M)[:, None] & mask_d[None, :]
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_rm + cols[None, :] * stride_rd, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(S.dtype.element_ty)  # rounded to the stream's dtype, as `x + residual` would be
        tl.store(S + rows[:, None] * D + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    mean = tl.sum(x, 1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(tl.sum(xc * xc, 1) / D + tl.cast(eps, tl.float32))  # torch.compile passes floats as fp64
    w = tl.load(W + cols, mask=mask_d, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask_d, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows[:, None] * D + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=rows < M)
    tl.store(Rstd + rows, rstd, mask=rows < M)


@triton.jit
def _layer_norm_bwd_kernel(
    DY, DS, X, W, Mean, Rstd, DX, DW_partial, DB_partial, M, D, rows_per_program,
    stride_dym, stride_dyd, stride_dsm, stride_dsd,
    HAS_DS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    w = tl.load(W + cols, mask=mask_d, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask_m = rows < row_end
        mask = mask_m[:, None] & mask_d[None, :]
        x = tl.load(X + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyd, mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        mean = tl.load(Mean + rows, mask=mask_m, other=0.0)
        rstd = tl.load(Rstd + rows, mask=mask_m, other=0.0)
        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        c1 = tl.sum(x_hat * g, 1) / D
        c2 = tl.sum(g, 1) / D
        dx = (g - (x_hat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS:
            ds = tl.load(DS + rows[:, None] * stride_dsm + cols[None, :] * stride_dsd, mask=mask, other=0.0)
            dx += ds.to(tl.float32)
        tl.store(DX + rows[:, None] * D + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
        db += dy
    tl.store(DW_partial + pid * D + cols, tl.sum(dw, 0), mask=mask_d)
    tl.store(DB_partial + pid * D + cols, tl.sum(db, 0), mask=mask_d)


# ---------------------------------------------------------------------------------------------------------------
# Launchers


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None) -> int:
    if weight is None or bias is None:
        raise ValueError("layer_norm: weight and bias are required (the Triton LayerNorm is affine)")
    check_inputs("layer_norm", x=x, weight=weight, bias=bias, residual=residual)
    D = int(x.shape[-1]) if x.dim() else 0  # BLOCK_D derives from it: specialised under torch.compile
    if x.dim() == 0 or weight.shape != (D,) or bias.shape != (D,):
        raise ValueError(
            f"layer_norm: weight and bias must have shape (D,) with D = x.shape[-1]; got x {tuple(x.shape)}, "
            f"weight {tuple(weight.shape)}, bias {tuple(bias.shape)}"
        )
    if not 0 < D <= MAX_DIM:
        raise ValueError(f"layer_norm: normalised dim D={D} must be in [1, {MAX_DIM}]")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"layer_norm: residual must have x's shape; got x {tuple(x.shape)}, residual {tuple(residual.shape)}"
        )
    return D


def _fwd_config(D: int) -> dict:
    block_d = pow2_at_least(D)
    block_m = row_block(block_d)
    return dict(BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps_for(block_m * block_d))


def _layer_norm_fwd(x, residual, weight, bias, eps):
    """Shared body of the two forward ops; returns y, s (None without residual), mean, rstd."""
    D = _check(x, weight, bias, residual)
    x2 = x.reshape(-1, D)  # (M, D), a view whenever the strides allow
    M = x2.shape[0]
    # As `x + residual` would: the sum and the output take the promoted dtype (fp32 + bf16 -> fp32, under autocast).
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = empty(x.shape, dtype, x.device)  # (..., D), contiguous
    s = None if residual is None else empty(x.shape, dtype, x.device)
    mean = empty(x.shape[:-1], torch.float32, x.device)  # (...)
    rstd = empty(x.shape[:-1], torch.float32, x.device)
    if M == 0:
        return y, s, mean, rstd
    r2 = x2 if residual is None else residual.reshape(-1, D)
    weight, bias = weight.contiguous(), bias.contiguous()  # indexed densely
    cfg = _fwd_config(D)
    launcher(_layer_norm_fwd_kernel)[(triton.cdiv(M, cfg["BLOCK_M"]),)](
        x2, r2, weight, bias, y, y if s is None else s, mean, rstd, M, D, eps,
        *x2.stride(), *r2.stride(),
        HAS_RESIDUAL=residual is not None, **cfg,
    )  # fmt: skip
    return y, s, mean, rstd


@register_op("layer_norm_fwd")
def layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward launcher without residual: returns y (x's shape and dtype), mean and rstd (x.shape[:-1], fp32)."""
    y, _, mean, rstd = _layer_norm_fwd(x, None, weight, bias, eps)
    return y, mean, rstd


@register_op("add_layer_norm_fwd")
def add_layer_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward launcher with residual: returns y = LN(x + residual), s = x + residual, mean, rstd."""
    return _layer_norm_fwd(x, residual, weight, bias, eps)


@register_op("layer_norm_bwd")
def layer_norm_bwd(
    dy: torch.Tensor,
    ds: torch.Tensor | None,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launcher.

    Args:
        dy: gradient of y, x's shape, any strides.
        ds: gradient of the residual-sum output s, or None.
        x: the normalised input as saved by the forward (s when there was a residual), contiguous.
        weight, mean, rstd: as in the forward.

    Returns:
        dx (x's shape and dtype; also the residual's gradient), dweight, dbias (weight's dtype). Autograd casts dx
        to the dtypes of x and residual where they differ.
    """
    check_inputs("layer_norm backward", dy=dy, ds=ds, x=x, weight=weight)
    D = int(x.shape[-1])
    if dy.shape != x.shape or (ds is not None and ds.shape != x.shape):
        raise ValueError(
            f"layer_norm backward: gradients must have x's shape {tuple(x.shape)}; got dy {tuple(dy.shape)}"
            + ("" if ds is None else f", ds {tuple(ds.shape)}")
        )
    x, weight = x.contiguous(), weight.contiguous()  # indexed densely, as are mean and rstd
    mean, rstd = mean.contiguous(), rstd.contiguous()
    M = x.numel() // D
    dx = empty(x.shape, x.dtype, x.device)
    cfg = _fwd_config(D)
    num_programs, rows_per_program = reduction_grid(M, cfg["BLOCK_M"], x.device)
    dw_partial = empty((num_programs, D), torch.float32, x.device)
    db_partial = empty((num_programs, D), torch.float32, x.device)
    if M == 0:
        dw_partial.zero_()
        db_partial.zero_()
    else:
        dy2 = dy.reshape(-1, D)
        ds2 = dy2 if ds is None else ds.reshape(-1, D)
        launcher(_layer_norm_bwd_kernel)[(num_programs,)](
            dy2, ds2, x, weight, mean, rstd, dx, dw_partial, db_partial, M, D, rows_per_program,
            *dy2.stride(), *ds2.stride(),
            HAS_DS=ds is not None, **cfg,
        )  # fmt: skip
    return dx, dw_partial.sum(0).to(weight.dtype), db_partial.sum(0).to(weight.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Autograd and functional entry point


class LayerNormFunction(torch.autograd.Function):
    """Differentiable LayerNorm: apply(x, residual, weight, bias, eps) -> (y, mean, rstd) without residual, or
    (y, s, mean, rstd) with one; saves the normalised input and the fp32 mean/rstd (not differentiable)."""

    @staticmethod
    def forward(x, residual, weight, bias, eps):
        if residual is None:
            return layer_norm_fwd(x, weight, bias, eps)
        return add_layer_norm_fwd(x, residual, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, residual, weight, _, _ = inputs
        ctx.has_residual = residual is not None
        normalised = output[1] if ctx.has_residual else x  # s = x + residual, or x
        mean, rstd = output[-2:]
        ctx.save_for_backward(normalised, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None instead of a tensor of zeros

    @staticmethod
    def backward(ctx, dy, *grads):
        ds = grads[0] if ctx.has_residual else None
        x, weight, mean, rstd = ctx.saved_tensors
        if dy is None:  # only the residual sum s was used
            dx, dweight, dbias = ds, torch.zeros_like(weight), torch.zeros_like(weight)
        else:
            dx, dweight, dbias = layer_norm_bwd(dy, ds, x, weight, mean, rstd)
        return dx, dx if ctx.has_residual else None, dweight, dbias, None


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
):
    """LayerNorm over the last dim, optionally after a fused residual add (Triton).

    Args:
        x: (..., D) float32, float16 or bfloat16, D <= 8192.
        weight, bias: (D,) affine parameters, any of the three float dtypes (computed in fp32).
        eps: added to the variance.
        residual: optional tensor of x's shape added to x before normalising.

    Returns:
        LN(x) when residual is None, else (LN(x + residual), x + residual); outputs in x's dtype, or in the promoted
        dtype of x and residual (as `x + residual` gives it).

    Example:
        >>> x, r = torch.randn(2, 3, 2, 256, 512, device="cuda").unbind(0)
        >>> y, s = layer_norm(x, torch.ones(512, device="cuda"), torch.zeros(512, device="cuda"), residual=r)
    """
    out = LayerNormFunction.apply(x, residual, weight, bias, float(eps))
    return out[0] if residual is None else (out[0], out[1])


__all__ = ["MAX_DIM", "LayerNormFunction", "add_layer_norm_fwd", "layer_norm", "layer_norm_bwd", "layer_norm_fwd"]
