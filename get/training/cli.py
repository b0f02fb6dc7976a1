"""Command-line options both training scripts (train/train_get.py, train/train_dmd.py) share."""

from __future__ import annotations

import argparse


def add_common_arguments(p, sample_every: int, ckpt_every: int) -> None:
    """Command-line options every training script shares: AdamW betas/eps, seed, TF32, the non-finite guard,
    outputs and processes (train_get.py and train_dmd.py add their own around them)."""
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls (paper: on)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-nonfinite", type=int, default=10, help="stop after this many non-finite steps in a row")
    # Outputs.
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--sample-every", type=int, default=sample_every)
    p.add_argument("--ckpt-every", type=int, default=ckpt_every)
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept (the newest)")
    p.add_argument("--grid-seeds", type=str, default="0-63", help="seeds of the sample grid (EDM syntax)")
    # Processes.
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--nproc", type=int, default=None, help="local worker processes to start (default: torchrun's)")


def check_common_arguments(p, args) -> None:
    """Validates the shared options (and --bs, --steps, --ema, which every script has), with parser errors."""
    for name in ("bs", "steps", "log_every", "sample_every", "ckpt_every", "keep", "max_nonfinite"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.ema < 1:
        p.error("--ema must be in [0, 1)")
