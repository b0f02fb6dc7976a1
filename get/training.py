"""What every training run writes and restores: EMA, atomic checkpoints with exact resume, logs, grids, guards.

Shared by train/train_get.py and train/train_dmd.py; the scripts keep only their loops.

A run folder holds:

    options.json              the resolved command-line options of the first start (options-resume-NNNNNNN.json later)
    stats.jsonl               one JSON line per logged step (rank 0)
    tb/                       TensorBoard events (rank 0)
    samples/NNNNNNN.png       sample grids
    loss.png                  the loss curve
    checkpoints/NNNNNNN/      one folder per checkpoint, complete or absent:
        <name>.safetensors    each module's state dict, e.g. model.safetensors and ema.safetensors
        config.json           the "model" module's config: ``GET.from_pretrained(folder)`` loads the EMA weights
        optimizers.pt         {name: optimizer.state_dict()} (plain tensors and numbers; weights_only loadable)
        rng-rankRRR.pt        each rank's torch / CUDA / numpy / python / generator RNG states
        checkpoint.json       step, module configs, world size and the loop's own state (written last)

A checkpoint is written under a temporary folder name and renamed when complete, so a crash at any moment leaves
either the whole checkpoint or none. Multi-node runs need the run folder on a shared file system.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file

from get import dist
from get.io import atomic_write_bytes, fsync_dir, read_json, save_safetensors, write_json
from get.safety import check_torch_zip

CHECKPOINT_FORMAT = "get-train-checkpoint"
CHECKPOINT_VERSION = 1
_CKPT_RE = re.compile(r"^\d{7,}$")
PRIMARY = "model"  # the module whose save_pretrained writes config.json beside the weights

# ----------------------------------------------------------------------------
# Seeds and RNG state.


def derived_seed(*keys: int) -> int:
    """A 32-bit seed hashed from non-negative integers (numpy SeedSequence): decorrelated streams from one seed."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def rank_seed(seed: int, rank: int) -> int:
    """The seed of one rank of a run seeded with `seed`."""
    return derived_seed(seed, rank)


def seed_all(seed: int) -> None:
    """Seeds python, numpy and torch (CPU and every CUDA device) with one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict:
    """This process's RNG states as plain tensors, lists and numbers (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Restores what `rng_state` returned; `generators` are the same named generators, restored in place."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        if name not in state["generators"]:
            raise KeyError(f"checkpoint has no state for the generator {name!r}; it has {sorted(state['generators'])}")
        g.set_state(state["generators"][name])


# ----------------------------------------------------------------------------
# Modules: unwrap, freeze, EMA.


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
    instead of drifting by float rounding as in the official trainer (GET.md §13.12).

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


# ----------------------------------------------------------------------------
# Data order.


def micro_batches(ds, sampler, micro_bs: int, device: torch.device):
    """Endless micro-batches of this rank's slice of each epoch's permutation, from the sampler's position on.

    The sampler's position advances as batches are handed out (nothing runs ahead), so its state_dict() is exactly
    what training consumed. An epoch's last partial micro-batch is dropped.

    Args:
        ds: a `get.data.PairDataset` (anything with `get_batch(indices) -> dict of tensors`).
        sampler: its `get.data.EpochSampler`; save `sampler.state_dict()` in checkpoints for exact resume.
        micro_bs: samples per micro-batch on this rank.
        device: where the batches go.
    """
    while True:
        indices = sampler.indices()  # (n // world,) this rank's slice of the epoch's global permutation
        while sampler.position + micro_bs <= len(indices):
            batch = ds.get_batch(indices[sampler.position:sampler.position + micro_bs])
            sampler.advance(micro_bs)
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        sampler.set_epoch(sampler.epoch + 1)


# ----------------------------------------------------------------------------
# Run folder and checkpoints.


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of interrupted saves are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _CKPT_RE.match(p.name) and (p / "checkpoint.json").is_file()]
    return sorted(found, key=lambda p: int(p.name))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prepare_run_dir(outdir: str | os.PathLike, options: dict, resume: bool) -> tuple[Path, Path | None]:
    """Creates or reopens a run folder and records the options (rank 0 writes; all ranks return the same).

    A folder that already has checkpoints is refused unless `resume` is set, so a run is never overwritten. With
    `resume` and no checkpoint the run starts fresh (convenient for pre-emptible jobs that always pass --resume).

    Args:
        outdir: the run folder.
        options: JSON-able resolved options, written to options.json (options-resume-NNNNNNN.json on resume).
        resume: continue from the latest checkpoint.

    Returns:
        (run folder, latest checkpoint to resume from or None).
    """
    run_dir = Path(outdir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and not resume:
        raise FileExistsError(f"{run_dir} already holds a run (latest checkpoint {ckpt.name}); pass --resume to "
                              f"continue it or choose another --outdir")
    if not resume and (run_dir / "options.json").exists():
        raise FileExistsError(f"{run_dir} already holds a run (options.json, no checkpoint yet); pass --resume to "
                              f"restart it or choose another --outdir")
    dist.barrier()  # every rank has looked before rank 0 writes
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        name = "options.json" if ckpt is None else f"options-resume-{int(ckpt.name):07d}.json"
        write_json(run_dir / name, options)
    dist.barrier()
    return run_dir, ckpt


def _module_config(module: nn.Module) -> dict | None:
    config = getattr(module, "config", None)
    return json.loads(json.dumps(config)) if config is not None else None  # as stored: tuples become lists


def _config_diff(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k, '<absent>')!r} vs now {current.get(k, '<absent>')!r}"
            for k in keys if saved.get(k, "<absent>") != current.get(k, "<absent>")]


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    state: dict | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    keep: int | None = None,
) -> Path:
    """Writes checkpoint `step` of a run; collective: every rank calls it.

    Rank 0 writes the modules (unwrapped), optimizers and `checkpoint.json`; every rank writes its RNG states. All of
    it goes into a temporary folder that is renamed to checkpoints/NNNNNNN only once complete. Then the oldest
    checkpoints beyond the newest `keep` are deleted.

    Args:
        run_dir: the run folder.
        step: the number of optimiser steps taken so far.
        modules: named modules, e.g. {"model": model, "ema": ema}, each saved as <name>.safetensors. The one named
            "model" is written by its `save_pretrained` when it has one, which adds config.json; with an EMA copy
            named "ema" the folder then loads with `GET.from_pretrained(folder, ema=True)`.
        optimizers: named optimizers.
        state: the loop's JSON-able state (sampler position, counters, ...).
        generators: named torch.Generators whose states are saved per rank.
        keep: keep this many newest checkpoints; None keeps all.

    Returns:
        The checkpoint folder.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"{step:07d}"
    tmp = root / f".tmp-{step:07d}"
    rank = dist.get_rank()
    if dist.is_main():
        if tmp.exists():
            shutil.rmtree(tmp)  # left by an interrupted save
        tmp.mkdir(parents=True)
    dist.barrier()
    atomic_write_bytes(tmp / f"rng-rank{rank:03d}.pt", _torch_bytes(rng_state(generators)))
    dist.barrier()
    if dist.is_main():
        for name, module in modules.items():
            module = unwrap(module)
            if name == PRIMARY and hasattr(module, "save_pretrained"):
                module.save_pretrained(tmp)  # model.safetensors + config.json, as GET.from_pretrained reads them
            else:
                save_safetensors(tmp / f"{name}.safetensors", module.state_dict())
        if optimizers:
            atomic_write_bytes(tmp / "optimizers.pt", _torch_bytes({k: o.state_dict() for k, o in optimizers.items()}))
        meta = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": step,
            "world_size": dist.get_world_size(),
            "time": time.time(),
            "modules": {name: _module_config(unwrap(m)) for name, m in modules.items()},
            "optimizers": sorted(optimizers or {}),
            "state": state or {},
        }
        write_json(tmp / "checkpoint.json", meta)  # last: its presence marks a complete folder
        if final.exists():  # the same step saved again (e.g. right after a resume): swap atomically
            old = root / f".old-{step:07d}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
        if keep is not None:
            for old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old)
    dist.barrier()
    return final


class CheckpointMismatchError(ValueError):
    """A checkpoint was written for another model configuration."""


def load_checkpoint(
    path: str | os.PathLike,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    restore_rng: bool = True,
) -> dict:
    """Loads a checkpoint written by `save_checkpoint` into the given modules and optimizers, in place.

    Every module's config must equal the saved one; otherwise nothing is loaded and CheckpointMismatchError names
    the differing keys. This rank's RNG states are restored when the world size is the one the checkpoint was
    written with; with another world size they are left alone (data order is unaffected; per-rank noise differs).

    Args:
        path: a checkpoint folder (checkpoints/NNNNNNN).
        modules: named modules matching the saved names (wrappers are unwrapped).
        optimizers: named optimizers matching the saved names.
        generators: named generators to restore.
        restore_rng: restore RNG states (False for e.g. fine-tuning from weights).

    Returns:
        The checkpoint metadata: {"step", "world_size", "modules", "state", ...}; "rng_restored" says whether the
        RNG states were restored.
    """
    path = Path(path)
    meta = read_json(path / "checkpoint.json")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a training checkpoint (checkpoint.json has format {meta.get('format')!r})")
    missing = sorted(set(modules) - set(meta["modules"]))
    if missing:
        raise KeyError(f"{path}: no module(s) {missing} in the checkpoint; it has {sorted(meta['modules'])}")
    for name, module in modules.items():
        saved, current = meta["modules"][name], _module_config(unwrap(module))
        if saved is not None and current is not None and saved != current:
            diff = "; ".join(_config_diff(saved, current))
            raise CheckpointMismatchError(
                f"{path}: the checkpoint's {name!r} was trained with another model configuration ({diff}); "
                f"use the same --model and data, or another --outdir")
    for name, module in modules.items():
        module = unwrap(module)
        file = path / f"{name}.safetensors"
        tensors = load_file(str(file), device=str(next(module.parameters()).device))
        result = module.load_state_dict(tensors, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointMismatchError(f"{file}: state dict does not match the {name!r} module (missing "
                                          f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})")
    if optimizers:
        check_torch_zip(path / "optimizers.pt")
        saved_opt = torch.load(path / "optimizers.pt", map_location="cpu", weights_only=True)
        for name, opt in optimizers.items():
            if name not in saved_opt:
                raise KeyError(f"{path}/optimizers.pt has no optimizer {name!r}; it has {sorted(saved_opt)}")
            opt.load_state_dict(saved_opt[name])
    meta["rng_restored"] = False
    if restore_rng and meta["world_size"] == dist.get_world_size():
        rng_file = path / f"rng-rank{dist.get_rank():03d}.pt"
        check_torch_zip(rng_file)
        rng = torch.load(rng_file, map_location="cpu", weights_only=True)
        set_rng_state(rng, generators)
        meta["rng_restored"] = True
    return meta


# ----------------------------------------------------------------------------
# Logs, plots and grids.


class StatsLogger:
    """Appends one JSON line per call to stats.jsonl and the scalars to TensorBoard; rank 0 only.

    On resume from step S, lines after S (written after the checkpoint by the interrupted run) are dropped and
    TensorBoard purges events after S, so the logs read as one uninterrupted run.
    """

    def __init__(self, run_dir: str | os.PathLike, start_step: int = 0, tensorboard: bool = True):
        self.path = Path(run_dir) / "stats.jsonl"
        self.enabled = dist.is_main()
        self.writer = None
        if not self.enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= start_step]
            atomic_write_bytes(self.path, "".join(line + "\n" for line in kept).encode())
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, stats: Mapping[str, float]) -> None:
        """Writes {"step": step, **stats}; values must be numbers (lists are written to JSON only)."""
        if not self.enabled:
            return
        record = {"step": step, **stats}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self.writer is not None:
            for key, value in stats.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _step_of(line: str) -> float:
    # A line cut short by a crash, or blank, sorts after every step so that a resume drops it.
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def read_stats(run_dir: str | os.PathLike) -> list[dict]:
    """The records of a run's stats.jsonl."""
    path = Path(run_dir) / "stats.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(run_dir: str | os.PathLike, keys: Iterable[str] = ("loss", "loss_last"),
                    path: str | os.PathLike | None = None) -> Path | None:
    """Plots the given stats.jsonl series against the step (log-scale y) to loss.png; None when nothing is logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_stats(run_dir)
    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key]) and r[key] > 0]
        if pts:
            ax.plot(*zip(*pts), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path = Path(path) if path is not None else Path(run_dir) / "loss.png"
    atomic_write_bytes(path, buf.getvalue())
    return path


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Tiles (N, C, H, W) images in [-1, 1] into one PNG, nrow per row (default: a square-ish grid).

    Args:
        images: (N, C, H, W) with C = 1 or 3.
        path: the PNG to write (atomically).
        nrow: images per row.
    """
    from PIL import Image

    from get.metrics import to_uint8

    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"save_image_grid needs 1 or 3 channels, got shape {tuple(images.shape)}")
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = torch.zeros(ncol * h, nrow * w, c, dtype=torch.uint8)
    for i, img in enumerate(to_uint8(images.detach().float().cpu()).permute(0, 2, 3, 1)):  # (H, W, C) each
        r, q = divmod(i, nrow)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    array = grid.numpy()
    pil = Image.fromarray(array[..., 0] if c == 1 else array, "L" if c == 1 else "RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ----------------------------------------------------------------------------
# Guards and meters.


class TrainingDivergedError(RuntimeError):
    """Training stopped after too many non-finite steps in a row."""


class NonFiniteGuard:
    """Counts skipped non-finite steps; raises TrainingDivergedError after `max_in_row` in a row.

    The loop asks `check(ok, step)` after computing the loss and gradient norm and before the optimiser step: on False
    it skips the optimiser and EMA updates for that step.
    """

    def __init__(self, max_in_row: int = 10):
        if max_in_row < 1:
            raise ValueError(f"max_in_row must be at least 1, got {max_in_row}")
        self.max_in_row = max_in_row
        self.in_row = 0
        self.total = 0

    def check(self, ok: bool, step: int) -> bool:
        """Records one step's finiteness; returns `ok`; raises once `max_in_row` bad steps follow each other."""
        if ok:
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        if self.in_row >= self.max_in_row:
            raise TrainingDivergedError(
                f"{self.in_row} non-finite steps in a row (the last at step {step}, {self.total} in all): stopping. "
                f"The last good checkpoint is kept; resume from it with a lower learning rate, --clip-grad, "
                f"or without --bf16")
        return False

    def state_dict(self) -> dict:
        return {"in_row": self.in_row, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.in_row, self.total = int(state["in_row"]), int(state["total"])


class Throughput:
    """Images per second between calls of `rate()` (call it where the loop already synchronises)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.count = 0

    def update(self, n: int) -> None:
        self.count += n

    def rate(self, reset: bool = True) -> float:
        elapsed = time.perf_counter() - self.start
        value = self.count / elapsed if elapsed > 0 else 0.0
        if reset:
            self.reset()
        return value


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
