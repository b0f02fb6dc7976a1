"""get.data: seed strings, shard writer and manifest, verification, the memory-mapped PairDataset, EpochSampler."""

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors import safe_open

from get import data
from get.seeds import format_seeds, parse_seeds

C, R = 3, 4


def make_folder(root, seeds, shard_size=5, label_dim=0, image_dtype="float32", write=True):
    """A pair folder with known contents: noise = seed + position code, image = -noise (no teacher needed)."""
    settings = data.PairSettings(teacher={"name": "test", "sha256": "0" * 64, "config": {}}, label_dim=label_dim,
                                 tensors=data.tensor_spec(C, R, label_dim, image_dtype))
    manifest = data.open_manifest(root, data.new_manifest(settings, seeds, shard_size))
    if write:
        records = [data.write_shard(root, manifest, k, shard_tensors(s, label_dim))
                   for k, s in enumerate(data.shard_seeds(seeds, shard_size))]
        data.record_shards(manifest, records)
        data.write_manifest(root, manifest)
    return manifest


def shard_tensors(seeds, label_dim=0):
    s = torch.tensor(seeds, dtype=torch.int64)
    noise = s[:, None].double() + torch.arange(C * R * R, dtype=torch.float64) / 64  # (n, C*R*R)
    out = {"noise": noise.reshape(-1, C, R, R).float(), "image": -noise.reshape(-1, C, R, R).float(), "seed": s}
    if label_dim:
        out["label"] = s % label_dim
    return out


def test_shard_plan():
    seeds = parse_seeds("0-22,100-101")
    plan = data.shard_seeds(seeds, 10)
    assert [len(p) for p in plan] == [10, 10, 5] and sum(plan, []) == seeds
    assert format_seeds(plan[2]) == "20-22,100-101"
    with pytest.raises(ValueError, match="duplicates"):
        data.shard_seeds([1, 2, 2], 10)
    with pytest.raises(ValueError, match="shard_size"):
        data.shard_seeds([1], 0)


def test_manifest_shards_and_dataset(tmp_path):
    seeds = parse_seeds("0-11,50-52")
    manifest = make_folder(tmp_path, seeds, shard_size=5, label_dim=3)
    assert manifest["complete"] and [s["seeds"] for s in manifest["shards"]] == ["0-4", "5-9", "10-11,50-52"]
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == manifest and on_disk["settings"]["num_pairs"] == 15
    assert data.verify(tmp_path) == {}

    ds = data.PairDataset(tmp_path, verify=True)
    assert (len(ds), ds.channels, ds.resolution, ds.conditional, ds.label_dim) == (15, C, R, True, 3)
    ref = shard_tensors(seeds, 3)
    for i in [0, 4, 5, 12, 14, -1]:
        item = ds[i]
        assert item["noise"].dtype == torch.float32 and item["noise"].shape == (C, R, R)
        assert torch.equal(item["noise"], ref["noise"][i]) and torch.equal(item["image"], ref["image"][i])
        assert int(item["seed"]) == seeds[i] and int(item["label"]) == seeds[i] % 3
    order = [14, 0, 7, 3, 12, 7]
    batch = ds.get_batch(order)
    for key in ref:
        assert torch.equal(batch[key], ref[key][order]), key
    with pytest.raises(IndexError):
        ds[15]

    # The arrays are views of a memory map of the file, not copies in RAM.
    arrays = ds._arrays(0)
    assert isinstance(arrays["image"].base, np.memmap) or isinstance(arrays["image"].base.base, np.memmap)
    # Picklable for DataLoader workers (maps are reopened there), and batched fetching through __getitems__.
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._maps == {} and torch.equal(clone[9]["image"], ref["image"][9])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=data.EpochSampler(len(ds), seed=1))
    first = next(iter(loader))
    assert first["noise"].shape == (4, C, R, R) and first["label"].shape == (4,)
    assert torch.equal(first["image"], ref["image"][first["seed"] - torch.where(first["seed"] >= 50, 38, 0)])


def test_fp16_images_are_returned_as_float32(tmp_path):
    seeds = list(range(6))
    make_folder(tmp_path, seeds, image_dtype="float16")
    ds = data.PairDataset(tmp_path)
    ref = shard_tensors(seeds)["image"].half().float()
    assert ds[3]["image"].dtype == torch.float32 and torch.equal(ds.get_batch(range(6))["image"], ref)
    with safe_open(tmp_path / "shard-00000.safetensors", "pt") as f:
        assert f.get_slice("image").get_dtype() == "F16" and f.get_slice("noise").get_dtype() == "F32"


def test_bad_shards_are_named(tmp_path):
    seeds = list(range(20))
    manifest = make_folder(tmp_path, seeds, shard_size=5)
    files = [tmp_path / s["file"] for s in manifest["shards"]]
    raw = bytearray(files[1].read_bytes())
    raw[-3] ^= 0x40  # one bit in the image data: only the checksum sees it
    files[1].write_bytes(bytes(raw))
    files[2].write_bytes(files[2].read_bytes()[:-8])  # truncated
    files[3].unlink()

    bad = data.verify(tmp_path)
    assert sorted(bad) == [f.name for f in files[1:]]
    assert "sha256" in bad[files[1].name] and "bytes" in bad[files[2].name] and bad[files[3].name] == "missing"
    assert data.verify(tmp_path, checksum=False).keys() == {files[2].name, files[3].name}
    with pytest.raises(data.PairDataError, match="shard-00002.safetensors"):
        data.PairDataset(tmp_path)
    files[3].write_bytes(files[0].read_bytes())  # a valid shard of the same data set, under the wrong name
    files[2].write_bytes(files[0].read_bytes())
    with pytest.raises(data.PairDataError, match="shard-00002.safetensors.*another data set or shard"):
        data.PairDataset(tmp_path)


def test_refusals(tmp_path):
    seeds = list(range(10))
    manifest = make_folder(tmp_path / "a", seeds, write=False)
    with pytest.raises(data.PairDataError, match="incomplete"):
        data.PairDataset(tmp_path / "a")
    before = (tmp_path / "a" / "manifest.json").read_bytes()
    other = data.new_manifest({**manifest["settings"], "label_dim": 7}, seeds, 5)
    with pytest.raises(data.SettingsMismatchError, match="label_dim: 0 -> 7"):
        data.open_manifest(tmp_path / "a", other)
    with pytest.raises(data.SettingsMismatchError, match="seeds"):
        data.open_manifest(tmp_path / "a", data.new_manifest(manifest["settings"], list(range(11)), 5))
    assert (tmp_path / "a" / "manifest.json").read_bytes() == before
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "shard-00000.safetensors").write_bytes(b"x")
    with pytest.raises(data.SettingsMismatchError, match="no manifest.json"):
        data.open_manifest(tmp_path / "b", manifest)
    with pytest.raises(ValueError, match="shape"):
        data.write_shard(tmp_path / "a", manifest, 0, shard_tensors(list(range(4))))
    with pytest.raises(ValueError, match="seeds 1-5, expected 0-4"):
        data.write_shard(tmp_path / "a", manifest, 0, shard_tensors(list(range(1, 6))))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(data.PairDataError, match="not a pair manifest"):
        data.PairDataset(tmp_path / "c")


@pytest.mark.parametrize("n,world,drop_last", [(103, 4, True), (103, 4, False), (10, 1, True), (12, 3, True)])
def test_epoch_sampler_ranks_partition_one_permutation(n, world, drop_last):
    samplers = [data.EpochSampler(n, r, world, seed=5, drop_last=drop_last) for r in range(world)]
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
        parts = [list(s) for s in samplers]
        perm = samplers[0].permutation(epoch)
        assert sorted(perm.tolist()) == list(range(n))
        total = (n // world) * world if drop_last else n
        if drop_last:
            assert all(len(p) == n // world for p in parts)
        # Disjoint, covering the first `total` entries of the permutation, and step t's global batch is contiguous.
        flat = [i for p in parts for i in p]
        assert len(set(flat)) == len(flat) == total and set(flat) == set(perm[:total].tolist())
        interleaved = [parts[r][t] for t in range(len(parts[-1])) for r in range(world)]
        assert interleaved == perm[:len(interleaved)].tolist()
    assert samplers[0].permutation(0).tolist() != samplers[0].permutation(1).tolist()
    assert data.EpochSampler(n, 0, world, seed=6).permutation(0).tolist() != samplers[0].permutation(0).tolist()


def test_epoch_sampler_exact_resume():
    n, world, batch = 50, 2, 4
    live = [data.EpochSampler(n, r, world, seed=3) for r in range(world)]
    for s in live:
        s.set_epoch(2)
    seen = [list(s)[:3 * batch] for s in live]
    for s in live:
        s.advance(3 * batch)
    states = [s.state_dict() for s in live]

    resumed = [data.EpochSampler(n, r, world, seed=3) for r in range(world)]
    for s, st in zip(resumed, states):
        s.load_state_dict(st)
        s.set_epoch(2)  # the trainer's usual call at the top of the epoch keeps the position
    full = [data.EpochSampler(n, r, world, seed=3) for r in range(world)]
    for r in range(world):
        full[r].set_epoch(2)
        rest = list(resumed[r])
        assert seen[r] + rest == list(full[r]) and len(resumed[r]) == len(rest) == 25 - 12
    resumed[0].set_epoch(3)
    assert resumed[0].position == 0 and len(resumed[0]) == 25

    # Another world size continues exactly when the consumed samples split evenly: 24 consumed -> 4 ranks x 6.
    four = [data.EpochSampler(n, r, 4, seed=3) for r in range(4)]
    for s in four:
        s.load_state_dict(states[0])
    consumed = set(seen[0]) | set(seen[1])
    rest4 = [i for s in four for i in s]
    assert not consumed & set(rest4) and len(rest4) == 4 * (n // 4) - 24
    assert set(rest4) | consumed == set(four[0].permutation(2)[:48].tolist())
    with pytest.raises(ValueError, match="cannot be continued exactly"):
        data.EpochSampler(n, 0, 5, seed=3).load_state_dict({**states[0], "position": 1})
    with pytest.raises(ValueError, match="seed"):
        data.EpochSampler(n, 0, 2, seed=4).load_state_dict(states[0])
    with pytest.raises(ValueError, match="passes the epoch"):
        live[0].advance(100)


def test_non_finite_values_are_never_written(tmp_path):
    """The shard writer refuses NaN, inf and float16 overflow, naming the file and the seeds; nothing is written."""
    manifest = make_folder(tmp_path, parse_seeds("0-9"), write=False)
    tensors = shard_tensors(list(range(5)))
    tensors["image"][[1, 3], 0, 2, 1] = torch.tensor([float("nan"), float("-inf")])
    with pytest.raises(ValueError, match=r"shard-00000.safetensors: tensor 'image' is not finite .* for 2 of 5 "
                                         r"seeds: 1,3; nothing written"):
        data.write_shard(tmp_path, manifest, 0, tensors)
    tensors = shard_tensors(list(range(5, 10)))
    tensors["noise"][4] = float("nan")
    with pytest.raises(ValueError, match=r"tensor 'noise' is not finite .* seeds: 9;"):
        data.write_shard(tmp_path, manifest, 1, tensors)
    half = make_folder(tmp_path / "half", parse_seeds("0-4"), image_dtype="float16", write=False)
    tensors = shard_tensors(list(range(5)))
    tensors["image"][2] = 1e5  # finite in float32, inf in float16
    with pytest.raises(ValueError, match=r"beyond float16's range\) for 1 of 5 seeds: 2;"):
        data.write_shard(tmp_path / "half", half, 0, tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half", "manifest.json"]
    assert sorted(p.name for p in (tmp_path / "half").iterdir()) == ["manifest.json"]


def test_only_our_stale_temporaries_are_removed(tmp_path):
    ours = [".shard-00003.safetensors.k2j_9x0a.tmp", ".manifest.json.abcd1234.tmp", ".pairs.png.zz_00000.tmp"]
    others = ["notes.tmp", ".manifest.json.tmp", ".shard-3.safetensors.abc.tmp", ".model.safetensors.abcd1234.tmp",
              "manifest.json.abcd1234.tmp", ".pairs.png.abcd1234.tmp.bak"]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"x")
    removed = data.remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)


def test_sampler_settings_are_checked():
    assert data.SamplerSettings(S_max=float("inf")).S_max == float("inf")
    for kwargs, message in [(dict(S_churn=-1), "S_churn must be >= 0"), (dict(rho=0), "rho must be > 0"),
                            (dict(rho=-7), "rho must be > 0"), (dict(sigma_min=-1), "sigma_min must be > 0"),
                            (dict(S_noise=-0.5), "S_noise must be >= 0"), (dict(S_min=2, S_max=1), "S_min must be <="),
                            (dict(num_steps=1), "num_steps must be an integer >= 2"),
                            (dict(sigma_max=float("nan")), "sigma_max must be a number"),
                            (dict(S_churn=float("inf")), "S_churn must be finite")]:
        with pytest.raises(ValueError, match=message):
            data.SamplerSettings(**kwargs)
    bad = data.PairSettings(teacher={}, tensors=data.tensor_spec(C, R, 0)).to_dict()
    bad["sampler"]["rho"] = -7.0  # a manifest with settings no sampler accepts
    with pytest.raises(data.PairDataError, match="settings: rho must be > 0"):
        data.PairSettings.from_dict(bad)
