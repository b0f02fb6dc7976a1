"""The pair set of a run: its identity in checkpoints (a resume on other data is refused unless asked), the
sampler's resume named by --data, and the finiteness scan of a held-out set."""

from __future__ import annotations

import torch

from get import dist
from get.io import json_sha256
from get.training.cli import UserError


def data_identity(ds) -> dict:
    """What identifies a pair set (a `get.data.PairDataset`): the sha256 of its manifest's canonical JSON, which holds
    the settings, the seeds and every shard's sha256, so two sets of the same shape but other pairs differ."""
    return {"root": str(ds.root), "num_pairs": len(ds), "manifest_sha256": json_sha256(ds.manifest)}


def resume_data(state: dict, ds, sampler, allow_change: bool) -> dict | None:
    """Checks a checkpoint's pair set against `ds` and restores the sampler; every refusal names --data.

    Args:
        state: the checkpoint's loop state, with "sampler" and (since it was recorded) "data", a `data_identity`.
        ds: the pair set of this run (--data).
        sampler: its `EpochSampler`, restored in place.
        allow_change: --allow-data-change: continue on another pair set (logged).

    Returns:
        None when the data is the checkpoint's, else {"from": old identity, "to": new identity} to record.
    """
    saved, now = state.get("data"), data_identity(ds)
    change = None
    if saved is None:
        dist.print0(f"The checkpoint predates recorded pair sets: --data {ds.root} cannot be checked against it.")
    if saved is not None and saved["manifest_sha256"] != now["manifest_sha256"]:
        if not allow_change:
            raise UserError(
                f"--data {ds.root}: not the pair set the checkpoint was trained on ({saved['root']}, "
                f"{saved['num_pairs']} pairs, manifest sha256 {saved['manifest_sha256'][:16]}...; now "
                f"{now['num_pairs']} pairs, {now['manifest_sha256'][:16]}...); pass the same --data, or "
                f"--allow-data-change to continue on this one")
        change = {"from": saved, "to": now}
        dist.print0(f"--allow-data-change: continuing on {ds.root} (manifest sha256 {now['manifest_sha256'][:16]}...) "
                    f"instead of {saved['root']} ({saved['manifest_sha256'][:16]}...)")
    try:
        sampler.load_state_dict(state["sampler"])
    except ValueError as e:  # the data order cannot continue on this set (another size)
        raise UserError(f"--data {ds.root}: {len(ds)} pairs; the checkpoint's data order was over "
                        f"{state['sampler']['n']} pairs and cannot continue on them ({e})") from e
    return change


def nonfinite_seeds(ds, batch: int = 4096, limit: int = 8) -> tuple[list[int], int]:
    """Seeds of pairs whose noise or image holds NaN/inf: (up to `limit` of them, how many in all); reads the set once
    in batches of `batch` pairs."""
    seeds, count = [], 0
    for start in range(0, len(ds), batch):
        pairs = ds.get_batch(list(range(start, min(start + batch, len(ds)))))
        bad = ~(torch.isfinite(pairs["noise"]).flatten(1).all(1) & torch.isfinite(pairs["image"]).flatten(1).all(1))
        count += int(bad.sum())
        seeds += pairs["seed"][bad][:limit - len(seeds)].tolist()
    return seeds, count
