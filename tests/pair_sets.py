"""A tiny pair set written through get.data, for the training and sampling tests."""

import hashlib
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from get.data import PairSettings, new_manifest, record_shards, tensor_spec, write_manifest, write_shard


def make_pairs(root, n=32, channels=3, resolution=8, label_dim=0, shard_size=16, nan=False, salt=0):
    """A pair folder written through get.data; the 'teacher' is a fixed smooth map of the noise.

    nan: True makes every image NaN, a collection of seeds only theirs; salt: another noise draw, i.e. another pair
    set of the same shape and seeds.
    """
    seeds = list(range(n))
    settings = PairSettings(teacher={"name": "test-map"}, label_dim=label_dim,
                            tensors=tensor_spec(channels, resolution, label_dim))
    manifest = new_manifest(settings, seeds, shard_size)
    os.makedirs(root, exist_ok=True)
    records = []
    for k in range(len(manifest["shards"])):
        shard_seeds = seeds[k * shard_size:(k + 1) * shard_size]
        noise = torch.randn(len(shard_seeds), channels, resolution, resolution,
                            generator=torch.Generator().manual_seed(k + 1000 * salt))
        image = 0.5 * torch.tanh(noise.flip(-1))
        tensors = dict(noise=noise, image=image, seed=torch.tensor(shard_seeds))
        if label_dim:
            tensors["label"] = torch.tensor(shard_seeds) % label_dim
        records.append(write_shard(root, manifest, k, tensors))
        bad = [i for i, s in enumerate(shard_seeds) if nan is True or (nan and s in nan)]
        if bad:  # a crafted shard: get.data never writes non-finite values, so NaN goes in after the writer
            path = Path(root) / records[-1]["file"]
            with safe_open(path, "pt") as f:
                meta, crafted = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
            crafted["image"][bad] = float("nan")
            save_file(crafted, path, metadata=meta)
            records[-1]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    write_manifest(root, record_shards(manifest, records))
    return Path(root)
