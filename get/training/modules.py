"""Modules in training: unwrapping DDP / torch.compile wrappers, freezing, the EMA update, the DDP consistency check."""

from __future__ import annotations

import torch
import torch.nn as nn

from get import dist


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


class MethodWrapper(nn.Module):
    """Calls `module.<method>` from forward, so that DistributedDataParallel sees the call and syncs gradients.

    DDP only hooks `forward`; GET is trained through `model.trajectory`. `unwrap` returns the inner module.
    """

    def __init__(self, module: nn.Module, method: str):
        super().__init__()
        self.module, self.method = module, method

    def forward(self, *args, **kwargs):
        return getattr(self.module, self.method)(*args, **kwargs)


def requires_grad(model: nn.Module, flag: bool = True) -> None:
    """Sets requires_grad on every parameter of a model."""
    for p in model.parameters():
        p.requires_grad_(flag)


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·param for every trainable parameter; buffers are copied.

    Non-trainable parameters (GET's fixed pos_embed) are skipped: they stay exactly what the EMA copy was built with,
    instead of drifting by float rounding as in the official trainer (docs/GET.md).

    Args:
        ema_model: the EMA copy (same architecture, not trained; its own requires_grad flags are ignored).
        model: the trained model, possibly wrapped in DDP.
        decay: per-step decay, e.g. 0.9999.
    """
    model = unwrap(model)
    ema_params = dict(ema_model.named_parameters())
    src, dst = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            src.append(p.detach())
            dst.append(ema_params[name])
    if dst:
        torch._foreach_lerp_(dst, [s.to(d.dtype) for s, d in zip(src, dst)], 1.0 - decay)
    ema_buffers = dict(ema_model.named_buffers())
    for name, b in model.named_buffers():
        ema_buffers[name].copy_(b)


def check_ddp_consistency(model: nn.Module) -> None:
    """Raises when the ranks' parameters differ (a float64 checksum per tensor; run it before saving)."""
    params = list(unwrap(model).named_parameters())
    sums = torch.stack([p.detach().double().sum() for _, p in params]).cpu().tolist()
    gathered = dist.all_gather_object(sums)
    for rank, other in enumerate(gathered):
        bad = [name for (name, _), a, b in zip(params, gathered[0], other) if a != b]
        if bad:
            raise RuntimeError(f"rank {rank}'s parameters differ from rank 0's ({bad[:5]}): the ranks are out of sync")
