"""A tiny pair set written through get.data, for the training and sampling tests."""

import os
from pathlib import Path

import torch

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
        bad = [i for i, s in enumerate(shard_seeds) if nan is True or (nan and s in nan)]
        image[bad] = float("nan")
        tensors = dict(noise=noise, image=image, seed=torch.tensor(shard_seeds))
        if label_dim:
            tensors["label"] = torch.tensor(shard_seeds) % label_dim
        records.append(write_shard(root, manifest, k, tensors))
    write_manifest(root, record_shards(manifest, records))
    return Path(root)
