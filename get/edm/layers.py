"""EDM's layer primitives, re-implemented from the description in docs/EDM.md

Parameter and buffer names define the state-dict keys of the official checkpoints, so they are fixed: ``weight`` /
``bias`` everywhere, ``resample_filter`` buffers only on resampling convs, ``freqs`` on the Fourier embedding.
Constructors take the official keyword arguments (including the init options, used only when training from scratch).
Tensors are created without an explicit device, so ``with torch.device('meta'):`` builds a network without memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["weight_init", "Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding", "FourierEmbedding"]


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int, gain: float = 1.0) -> torch.Tensor:
    """Random init tensor of ``shape`` for the four EDM modes (xavier/kaiming x uniform/normal), times ``gain``.

    One in-place draw per tensor (same distributions as EDM, not the same random stream); nothing is drawn when the
    default device is 'meta'.
    """
    gain = abs(float(gain))
    if torch.empty(0).is_meta:  # built under torch.device('meta'): shapes only (meta's normal_ pulls in torch._dynamo)
        if mode not in ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal"):
            raise ValueError(f"weight_init: invalid init mode {mode!r}")
        return torch.empty(*shape)
    if mode == "xavier_uniform":
        bound = gain * math.sqrt(6 / (fan_in + fan_out))
        return torch.empty(*shape).uniform_(-bound, bound)
    if mode == "xavier_normal":
        return torch.empty(*shape).normal_(0, gain * math.sqrt(2 / (fan_in + fan_out)))
    if mode == "kaiming_uniform":
        bound = gain * math.sqrt(3 / fan_in)
        return torch.empty(*shape).uniform_(-bound, bound)
    if mode == "kaiming_normal":
        return torch.empty(*shape).normal_(0, gain * math.sqrt(1 / fan_in))
    raise ValueError(f"weight_init: invalid init mode {mode!r}")


class Linear(nn.Module):
    """y = x W^T + b with W (out, in); parameters cast to x's dtype (mixed precision keeps fp32 master weights)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "kaiming_normal",
                 init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans, gain=init_weight))
        self.bias = nn.Parameter(weight_init([out_features], **fans, gain=init_bias)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)


class Conv2d(nn.Module):
    """Convolution with optional 2x up/down-sampling by a separable FIR filter (docs/EDM.md).

    Args:
        kernel: spatial size; 0 means no weight and no bias (a pure resampling layer).
        up, down: resample by 2 before (or, fused, around) the convolution; mutually exclusive.
        resample_filter: 1-D taps r; the 2-D filter is outer(r, r) / sum(r)^2 (a persistent buffer only if up/down).
        fused_resample: fuse the resampling with the convolution (used by NCSN++'s aux_residual).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[int] = (1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0):
        if up and down:
            raise ValueError("Conv2d: up and down are mutually exclusive")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans, gain=init_weight))
                       if kernel else None)
        self.bias = nn.Parameter(weight_init([out_channels], **fans, gain=init_bias)) if kernel and bias else None
        taps, norm = [float(t) for t in resample_filter], float(sum(resample_filter)) ** 2
        # outer(r, r) / sum(r)^2 built from Python numbers (no tensor op, so cheap under torch.device('meta')).
        f = torch.tensor([[a * b / norm for b in taps] for a in taps], dtype=torch.float32)[None, None]  # (1,1,L,L)
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0

        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                                   padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                       stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x.add_(b.reshape(1, -1, 1, 1))
        return x


class GroupNorm(nn.Module):
    """Group normalisation with min(num_groups, C // min_channels_per_group) groups."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        if self.num_groups < 1:
            raise ValueError(f"GroupNorm: {num_channels} channels are too few for groups of "
                             f"{min_channels_per_group}")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype), bias=self.bias.to(x.dtype),
                            eps=self.eps)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax_j(q_i . k_j / sqrt(C_h)) v_j with q, k, v (N*heads, C_h, HW); the softmax and products in float32
    (EDM's fp32 attention), output in q's dtype."""
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2),
                                         v.float().transpose(1, 2))  # (N*heads, HW, C_h)
    return out.transpose(1, 2).to(q.dtype)  # (N*heads, C_h, HW)


class UNetBlock(nn.Module):
    """Residual block with embedding injection and optional self-attention (docs/EDM.md).

    Args:
        in_channels, out_channels: channel counts.
        emb_channels: width of the embedding vector e.
        up, down: 2x resampling inside conv0 and the skip.
        attention: add a self-attention layer after the residual part.
        num_heads: attention heads (None: out_channels // channels_per_head).
        dropout: dropout probability before conv1 (training mode only).
        skip_scale: scale of the residual sums (sqrt(0.5) in SongUNet, 1 in DhariwalUNet).
        eps: GroupNorm epsilon.
        resample_filter: 1-D resampling taps.
        resample_proj: give the resampling skip a 1x1 projection even when the channels match.
        adaptive_scale: the embedding gives (scale, shift) (ADM) instead of an added bias (DDPM++).
        init, init_zero, init_attn: init kwargs for ordinary / zero-initialised / qkv layers.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int | None = None, channels_per_head: int = 64,
                 dropout: float = 0, skip_scale: float = 1, eps: float = 1e-5, resample_filter: Sequence[int] = (1, 1),
                 resample_proj: bool = False, adaptive_scale: bool = True, init: dict | None = None,
                 init_zero: dict | None = None, init_attn: dict | None = None):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_zero) if init_zero is not None else dict(init_weight=0)
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = 0 if not attention else (num_heads if num_heads is not None
                                                  else out_channels // channels_per_head)
        self.dropout, self.skip_scale, self.adaptive_scale = float(dropout), float(skip_scale), adaptive_scale
        resample = dict(up=up, down=down, resample_filter=resample_filter)

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, **resample, **init)
        if self.num_heads:
            if out_channels % self.num_heads:
                raise ValueError(f"UNetBlock: {out_channels} channels do not split into {self.num_heads} heads")
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init_attn if init_attn is not None
                                                                            else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))  # (N, out, H', W')
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)  # (N, out or 2*out, 1, 1)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x.add(params)))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x.add_(self.skip(orig) if self.skip is not None else orig).mul_(self.skip_scale)

        if self.num_heads:
            N, C, H, W = x.shape
            # qkv channels are laid out [head][channel within head][q|k|v]: channel 3*(head*C_h + c) + {0, 1, 2}.
            q, k, v = self.qkv(self.norm2(x)).reshape(N * self.num_heads, C // self.num_heads, 3, H * W).unbind(2)
            a = _attention(q, k, v).reshape(N, C, H, W)  # (N, C, H, W), channel = head*C_h + c
            x = self.proj(a).add_(x).mul_(self.skip_scale)
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding [cos(s f_i) | sin(s f_i)], f_i = (1/max_positions)^(i/(C/2 - endpoint))."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs  # (C/2,)
        x = x[:, None] * freqs.to(x.dtype)[None, :]  # (N, C/2) outer product
        return torch.cat([x.cos(), x.sin()], dim=1)  # (N, C)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2 pi s f) | sin(2 pi s f)], f ~ N(0, scale^2) stored as the buffer ``freqs``."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", weight_init([num_channels // 2], "kaiming_normal", fan_in=1, fan_out=1,
                                                  gain=scale))  # randn * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, None] * (2 * np.pi * self.freqs).to(x.dtype)[None, :]  # (N, C/2) outer product
        return torch.cat([x.cos(), x.sin()], dim=1)  # (N, C)
