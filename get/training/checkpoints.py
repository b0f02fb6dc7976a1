"""The run folder of a training run and its checkpoints, written atomically and restored exactly.

A run folder holds:

    options.json              the resolved command-line options of the first start (options-resume-NNNNNNN.json
                              on each resume), written once the start or resume has passed its checks
    stats.jsonl               one JSON line per logged step (rank 0)
    tb/                       TensorBoard events (rank 0)
    samples/NNNNNNN.png       sample grids
    loss.png                  the loss curve
    checkpoints/NNNNNNN/      one folder per checkpoint, complete or absent:
        <name>.safetensors    each module's state dict, e.g. model.safetensors and ema.safetensors
        config.json           the "model" module's config: ``GET.from_pretrained(folder)`` loads the EMA weights
        optimizers.pt         {name: optimizer.state_dict()} (plain tensors and numbers; weights_only loadable)
        rng-rankRRR.pt        each rank's torch / CUDA / numpy / python / generator RNG states
        checkpoint.json       step, module configs, world size and the loop's own state: sampler, guards, the pair
                              set's identity (get.training.pairs); written last

A checkpoint is written under a temporary folder name and renamed when complete, so a crash at any moment leaves
either the whole checkpoint or none. Multi-node runs need the run folder on a shared file system.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file

from get import dist
from get.io import atomic_write_bytes, fsync_dir, read_json, save_safetensors, write_json
from get.safety import check_torch_zip
from get.training.modules import unwrap

CHECKPOINT_FORMAT = "get-train-checkpoint"
CHECKPOINT_VERSION = 1
_CKPT_RE = re.compile(r"^\d{7,}$")
PRIMARY = "model"  # the module whose save_pretrained writes config.json beside the weights


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


def prepare_run_dir(outdir: str | os.PathLike, resume: bool) -> tuple[Path, Path | None]:
    """Checks a run folder before a run starts or resumes in it; writes nothing (see `record_options`).

    A folder that already has checkpoints is refused unless `resume` is set, so a run is never overwritten. With
    `resume` and no checkpoint the run starts fresh (convenient for pre-emptible jobs that always pass --resume).

    Args:
        outdir: the run folder.
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
    return run_dir, ckpt


def record_options(run_dir: str | os.PathLike, options: dict, ckpt: Path | None) -> None:
    """Writes the resolved options to options.json (options-resume-NNNNNNN.json when resuming from `ckpt`); rank 0
    writes, all ranks return together. Call it once every check of the start or resume has passed, so that a
    refused start leaves the run folder as it was."""
    run_dir = Path(run_dir)
    dist.barrier()  # every rank has looked at the folder before rank 0 writes
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        name = "options.json" if ckpt is None else f"options-resume-{int(ckpt.name):07d}.json"
        write_json(run_dir / name, options)
    dist.barrier()


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
