"""Bidirectional (non-causal) fused attention read from a packed QKV tensor: FlashAttention-2 forward and backward.

    S = scale * Q K^T,  P = softmax(S),  O = P V                    (per batch element and head)
    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - Delta),  Delta = rowsum(dO * O)
    dQ = scale * dS K,  dK = scale * dS^T Q

q, k and v are read straight from the qkv projection output viewed as (B, N, 3, H, d), through its strides, and O
is written as (B, N, H*d), so the permute copies around a standard attention call disappear. The forward keeps an
online softmax in base 2 and saves the natural log-sum-exp of each query row; the backward recomputes P from it.
The backward is non-causal throughout: every key block sees every query and vice versa (the Triton tutorial's
backward is causal-only). dK/dV (keys resident, loop over queries) and dQ (queries resident, loop over keys) are
two phases of one kernel, so no atomics are needed and the gradients are deterministic.

References: Dao, "FlashAttention-2" (arXiv 2307.08691), Algorithms 1 and 2; docs/KERNELS.md
"""

import math

import torch
import triton
import triton.language as tl

from .utils import check_inputs, dot_precision, empty, launcher, pow2_at_least, register_op

HEAD_DIMS = (32, 64, 128)


# ---------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_n, lo, hi, N, qk_scale,
    BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Online-softmax accumulation over the key tiles [lo, hi); MASK_N masks keys >= N (only the tail tile)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        valid_n = (start_n + offs_n) < N  # dead code (removed by the compiler) unless MASK_N
        if MASK_N:
            k = tl.load(k_ptrs + start_n * stride_n, mask=valid_n[None, :], other=0.0)  # (d, BLOCK_N)
            v = tl.load(v_ptrs + start_n * stride_n, mask=valid_n[:, None], other=0.0)  # (BLOCK_N, d)
        else:
            k = tl.load(k_ptrs + start_n * stride_n)
            v = tl.load(v_ptrs + start_n * stride_n)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASK_N:
            qk = tl.where(valid_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old running max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    QKV, Out, LSE, N, H, num_m_blocks, sm_scale,
    stride_qb, stride_qn, stride_q3, stride_qh, stride_qd,
    stride_ob, stride_on, stride_oc,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # A flat grid, query blocks fastest: the programs of one head run together and share its K/V in L2.
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    pid_bh = (pid // num_m_blocks).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    qkv = QKV + b * stride_qb + h * stride_qh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < N

    q = tl.load(qkv + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=mask_m[:, None], other=0.0)
    k_ptrs = qkv + stride_q3 + offs_d[:, None] * stride_qd + offs_n[None, :] * stride_qn  # K^T tile (d, BLOCK_N)
    v_ptrs = qkv + 2 * stride_q3 + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd  # (BLOCK_N, d)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    sm_scale = tl.cast(sm_scale, tl.float32)  # torch.compile passes Python floats as fp64 scalars
    qk_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
    n_full = (N // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_qn, 0, n_full, N, qk_scale,
        BLOCK_N, False, DOT_PRECISION,
    )  # fmt: skip
    if n_full < N:
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_qn, n_full, N, N, qk_scale,
            BLOCK_N, True, DOT_PRECISION,
        )  # fmt: skip

    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # natural log-sum-exp of the scaled scores
    o_ptrs = Out + b * stride_ob + offs_m[:, None] * stride_on + (h * HEAD_DIM + offs_d)[None, :] * stride_oc
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=mask_m[:, None])
    tl.store(LSE + pid_bh * N + offs_m, lse, mask=mask_m)


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out, DO, Delta, N, H, num_m_blocks,
    stride_ob, stride_on, stride_oc,
    stride_dob, stride_don, stride_doc,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Delta = rowsum(dO * O) in fp32, one value per (b, h, query)."""
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    pid_bh = (pid // num_m_blocks).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = h * HEAD_DIM + tl.arange(0, HEAD_DIM)
    mask_m = offs_m < N
    o = tl.load(Out + b * stride_ob + offs_m[:, None] * stride_on + cols[None, :] * stride_oc, mask=mask_m[:, None])
    do = tl.load(DO + b * stride_dob + offs_m[:, None] * stride_don + cols[None, :] * stride_doc, mask=mask_m[:, None])
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh * N + offs_m, delta, mask=mask_m)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v, q_ptrs, do_ptrs, LSE, Delta, stride_qn, stride_don, lo, hi, N, qk_scale,
    BLOCK_M: tl.constexpr, MASK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dK, dV of a resident key block accumulated over the query tiles [lo, hi); MASK_M masks queries >= N.

    Masked queries load q = dO = 0, lse = Delta = 0, so their P^T column is 1 and every product they enter is 0.
    """
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        valid_m = (start_m + offs_m) < N
        if MASK_M:
            qT = tl.load(q_ptrs + start_m * stride_qn, mask=valid_m[None, :], other=0.0)  # (d, BLOCK_M)
            do = tl.load(do_ptrs + start_m * stride_don, mask=valid_m[:, None], other=0.0)  # (BLOCK_M, d)
            lse = tl.load(LSE + start_m + offs_m, mask=valid_m, other=0.0)
            delta = tl.load(Delta + start_m + offs_m, mask=valid_m, other=0.0)
        else:
            qT = tl.load(q_ptrs + start_m * stride_qn)
            do = tl.load(do_ptrs + start_m * stride_don)
            lse = tl.load(LSE + start_m + offs_m)
            delta = tl.load(Delta + start_m + offs_m)
        qkT = tl.dot(k, qT, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(qkT * qk_scale - (lse * 1.4426950408889634)[None, :])
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, lo, hi, N, qk_scale,
    BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dQ of a resident query block accumulated over the key tiles [lo, hi); MASK_N zeroes P for keys >= N."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        valid_n = (start_n + offs_n) < N
        if MASK_N:
            kT = tl.load(k_ptrs + start_n * stride_kn, mask=valid_n[None, :], other=0.0)  # (d, BLOCK_N)
            vT = tl.load(v_ptrs + start_n * stride_kn, mask=valid_n[None, :], other=0.0)  # (d, BLOCK_N)
        else:
            kT = tl.load(k_ptrs + start_n * stride_kn)
            vT = tl.load(v_ptrs + start_n * stride_kn)
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(qk * qk_scale - (lse * 1.4426950408889634)[:, None])
        if MASK_N:
            p = tl.where(valid_n[None, :], p, 0.0)  # a padded key has k = 0, whose P could overflow
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_kernel(
    QKV, DO, LSE, Delta, DQKV, N, H, num_blocks, sm_scale,
    stride_qb, stride_qn, stride_q3, stride_qh, stride_qd,
    stride_dob, stride_don, stride_doc,
    stride_gb, stride_gn, stride_g3, stride_gh, stride_gd,
    HEAD_DIM: tl.constexpr, BLOCK_MAJOR: tl.constexpr, BLOCK_MINOR: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (block j, head): dK and dV of keys block j over all queries, then dQ of query block j over all keys."""
    pid = tl.program_id(0)
    pid_blk = pid % num_blocks
    pid_bh = (pid // num_blocks).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    qkv = QKV + b * stride_qb + h * stride_qh
    q_base = qkv
    k_base = qkv + stride_q3
    v_base = qkv + 2 * stride_q3
    do_base = DO + b * stride_dob + h * HEAD_DIM * stride_doc
    dqkv = DQKV + b * stride_gb + h * stride_gh
    LSE += pid_bh * N
    Delta += pid_bh * N
    sm_scale = tl.cast(sm_scale, tl.float32)  # torch.compile passes Python floats as fp64 scalars
    qk_scale = sm_scale * 1.4426950408889634
    offs_d = tl.arange(0, HEAD_DIM)
    offs_major = pid_blk * BLOCK_MAJOR + tl.arange(0, BLOCK_MAJOR)
    offs_minor = tl.arange(0, BLOCK_MINOR)
    mask_major = offs_major < N
    n_full = (N // BLOCK_MINOR) * BLOCK_MINOR

    # Phase 1: dK, dV for the keys offs_major.
    kv_offs = offs_major[:, None] * stride_qn + offs_d[None, :] * stride_qd
    k = tl.load(k_base + kv_offs, mask=mask_major[:, None], other=0.0)  # (BLOCK_MAJOR, d)
    v = tl.load(v_base + kv_offs, mask=mask_major[:, None], other=0.0)
    dk = tl.zeros([BLOCK_MAJOR, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_MAJOR, HEAD_DIM], dtype=tl.float32)
    q_ptrs = q_base + offs_d[:, None] * stride_qd + offs_minor[None, :] * stride_qn  # Q^T tile (d, BLOCK_MINOR)
    do_ptrs = do_base + offs_minor[:, None] * stride_don + offs_d[None, :] * stride_doc  # (BLOCK_MINOR, d)
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, q_ptrs, do_ptrs, LSE, Delta, stride_qn, stride_don, 0, n_full, N, qk_scale,
        BLOCK_MINOR, False, DOT_PRECISION,
    )  # fmt: skip
    if n_full < N:
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_ptrs, do_ptrs, LSE, Delta, stride_qn, stride_don, n_full, N, N, qk_scale,
            BLOCK_MINOR, True, DOT_PRECISION,
        )  # fmt: skip
    dk *= sm_scale
    g_offs = offs_major[:, None] * stride_gn + offs_d[None, :] * stride_gd
    tl.store(dqkv + stride_g3 + g_offs, dk.to(DQKV.dtype.element_ty), mask=mask_major[:, None])
    tl.store(dqkv + 2 * stride_g3 + g_offs, dv.to(DQKV.dtype.element_ty), mask=mask_major[:, None])

    # Phase 2: dQ for the queries offs_major.
    q = tl.load(q_base + kv_offs, mask=mask_major[:, None], other=0.0)  # (BLOCK_MAJOR, d)
    do = tl.load(
        do_base + offs_major[:, None] * stride_don + offs_d[None, :] * stride_doc, mask=mask_major[:, None], other=0.0
    )
    lse = tl.load(LSE + offs_major, mask=mask_major, other=0.0)
    delta = tl.load(Delta + offs_major, mask=mask_major, other=0.0)
    dq = tl.zeros([BLOCK_MAJOR, HEAD_DIM], dtype=tl.float32)
    kT_ptrs = k_base + offs_d[:, None] * stride_qd + offs_minor[None, :] * stride_qn  # (d, BLOCK_MINOR)
    vT_ptrs = v_base + offs_d[:, None] * stride_qd + offs_minor[None, :] * stride_qn
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_qn, 0, n_full, N, qk_scale,
        BLOCK_MINOR, False, DOT_PRECISION,
    )  # fmt: skip
    if n_full < N:
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_qn, n_full, N, N, qk_scale,
            BLOCK_MINOR, True, DOT_PRECISION,
        )  # fmt: skip
    dq *= sm_scale
    tl.store(dqkv + g_offs, dq.to(DQKV.dtype.element_ty), mask=mask_major[:, None])


# ---------------------------------------------------------------------------------------------------------------
# Launchers


def _fwd_config(N: int, d: int, BH: int, dtype: torch.dtype) -> dict:
    """Tiles and launch settings of the forward. Fixed heuristics rather than autotuning (autotuning breaks CUDA-graph
    capture and the interpreter); every choice compiles for sm_90 without register spills (ptxas, checked offline)."""
    if dtype == torch.float32:  # fp32 dots (IEEE or TF32) hold more in registers: smaller tiles, more warps
        return dict(BLOCK_M=_fit(64, N), BLOCK_N=_fit(32 if d <= 64 else 16, N), num_warps=8, num_stages=2)
    # 128-row query tiles while they still give a few waves on an H100 (132 SMs); 64 rows for small (eval) batches.
    block_m = _fit(128 if BH * triton.cdiv(N, 128) >= 264 else 64, N)
    return dict(BLOCK_M=block_m, BLOCK_N=_fit(64, N), num_warps=8 if block_m * d >= 128 * 128 else 4, num_stages=3)


def _bwd_config(N: int, d: int, dtype: torch.dtype) -> dict:
    """Tiles of the backward: BLOCK_MAJOR keys (or queries) stay resident while BLOCK_MINOR tiles stream past."""
    if dtype == torch.float32:
        return dict(BLOCK_MAJOR=_fit(64 if d <= 64 else 32, N), BLOCK_MINOR=_fit(16, N), num_warps=8, num_stages=2)
    block_major = _fit(128 if d <= 64 else 64, N)
    return dict(BLOCK_MAJOR=block_major, BLOCK_MINOR=_fit(32, N), num_warps=8 if block_major * d >= 64 * 128 else 4,
                num_stages=3)  # fmt: skip


def _fit(block: int, N: int) -> int:
    """A tile no longer than the sequence needs, and at least 16 (the smallest tl.dot operand on GPUs)."""
    return min(block, max(16, pow2_at_least(N)))


def _check_qkv(op: str, qkv: torch.Tensor) -> tuple[int, int, int, int]:
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"{op}: qkv must have shape (B, N, 3, H, d), got {tuple(qkv.shape)}")
    B, N, _, H, d = qkv.shape
    d = int(d)  # a compile-time constant of the kernels (specialised under torch.compile)
    if d not in HEAD_DIMS:
        raise ValueError(f"{op}: head dim d={d} is not supported; supported: {HEAD_DIMS}")
    return B, N, H, d


@register_op("attention_fwd")
def attention_fwd(qkv: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher.

    Args:
        qkv: (B, N, 3, H, d), any strides.
        scale: softmax scale.

    Returns:
        o: (B, N, H*d) in qkv's dtype; lse: (B, H, N) float32, the natural log-sum-exp of each row of scale*q k^T.
    """
    check_inputs("attention", qkv=qkv)
    B, N, H, d = _check_qkv("attention", qkv)
    o = empty((B, N, H * d), qkv.dtype, qkv.device)  # (B, N, H*d)
    lse = empty((B, H, N), torch.float32, qkv.device)  # (B, H, N)
    if o.numel() == 0:
        return o, lse
    cfg = _fwd_config(N, d, B * H, qkv.dtype)
    num_m_blocks = triton.cdiv(N, cfg["BLOCK_M"])
    launcher(_attn_fwd_kernel)[(num_m_blocks * B * H,)](
        qkv, o, lse, N, H, num_m_blocks, scale,
        *qkv.stride(), *o.stride(),
        HEAD_DIM=d, DOT_PRECISION=dot_precision(qkv.dtype), **cfg,
    )  # fmt: skip
    return o, lse


@register_op("attention_bwd")
def attention_bwd(
    do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, scale: float
) -> torch.Tensor:
    """Backward launcher.

    Args:
        do: (B, N, H*d) gradient of o, any strides (stride 0 from broadcasts is fine).
        qkv, o, lse: the forward's input and outputs.
        scale: the forward's softmax scale.

    Returns:
        dqkv: (B, N, 3, H, d) contiguous, in qkv's dtype.
    """
    check_inputs("attention backward", do=do, qkv=qkv, o=o)
    B, N, H, d = _check_qkv("attention backward", qkv)
    if do.shape != o.shape or o.shape != (B, N, H * d) or lse.shape != (B, H, N):
        raise ValueError(
            f"attention backward: shapes do not match qkv {tuple(qkv.shape)}: do {tuple(do.shape)}, "
            f"o {tuple(o.shape)}, lse {tuple(lse.shape)}"
        )
    if do.dtype != qkv.dtype:
        do = do.to(qkv.dtype)
    lse = lse.contiguous()  # indexed as a dense (B*H, N) array
    dqkv = empty((B, N, 3, H, d), qkv.dtype, qkv.device)  # (B, N, 3, H, d)
    if dqkv.numel() == 0:
        return dqkv
    delta = empty((B, H, N), torch.float32, qkv.device)  # (B, H, N)
    block_m = 64
    num_m_blocks = triton.cdiv(N, block_m)
    launcher(_attn_bwd_preprocess_kernel)[(num_m_blocks * B * H,)](
        o, do, delta, N, H, num_m_blocks, *o.stride(), *do.stride(), HEAD_DIM=d, BLOCK_M=block_m, num_warps=4,
    )  # fmt: skip
    cfg = _bwd_config(N, d, qkv.dtype)
    num_blocks = triton.cdiv(N, cfg["BLOCK_MAJOR"])
    launcher(_attn_bwd_kernel)[(num_blocks * B * H,)](
        qkv, do, lse, delta, dqkv, N, H, num_blocks, scale,
        *qkv.stride(), *do.stride(), *dqkv.stride(),
        HEAD_DIM=d, DOT_PRECISION=dot_precision(qkv.dtype), **cfg,
    )  # fmt: skip
    return dqkv


# ---------------------------------------------------------------------------------------------------------------
# Autograd and functional entry point


class AttentionFunction(torch.autograd.Function):
    """Differentiable packed-QKV attention: apply(qkv, scale) -> (o, lse); saves qkv, o and the fp32 log-sum-exp
    (no N x N matrix). lse is not differentiable."""

    @staticmethod
    def forward(qkv: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return attention_fwd(qkv, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (qkv, scale), (o, lse) = inputs, output
        ctx.save_for_backward(qkv, o, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, do: torch.Tensor, dlse: torch.Tensor | None):
        qkv, o, lse = ctx.saved_tensors
        return attention_bwd(do, qkv, o, lse, ctx.scale), None


def attention(qkv: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Bidirectional multi-head attention read from a packed QKV projection (Triton).

    Args:
        qkv: (B, N, 3, H, d): the fused qkv projection output viewed as q, k, v and heads; d in (32, 64, 128);
            float32, float16 or bfloat16; any strides.
        scale: softmax scale; default 1/sqrt(d).

    Returns:
        (B, N, H*d): the heads concatenated in head order, in qkv's dtype (the autocast dtype under autocast).

    Example:
        >>> qkv = torch.randn(2, 256, 3, 8, 64, device="cuda", dtype=torch.bfloat16)
        >>> attention(qkv).shape
        torch.Size([2, 256, 512])
    """
    d = _check_qkv("attention", qkv)[-1]
    if torch.is_autocast_enabled(qkv.device.type):  # as scaled_dot_product_attention does under autocast
        qkv = qkv.to(torch.get_autocast_dtype(qkv.device.type))
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"attention: scale must be a positive finite number, got {scale}")
    return AttentionFunction.apply(qkv, float(scale))[0]


__all__ = ["HEAD_DIMS", "AttentionFunction", "attention", "attention_bwd", "attention_fwd"]
