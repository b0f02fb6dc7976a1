"""One seeds contract: the image of seed s is the same in every script that samples a GET, alone or in a batch, and
the pairs' label policy reaches every reader."""

import importlib.util
import math
from pathlib import Path

import torch

from get.data import PairDataset, PairSettings, SamplerSettings, tensor_spec
from get.models import GET_models
from get.seeds import draw_inputs

ROOT = Path(__file__).resolve().parents[1]


def _script(name, path):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_get = _script("train_get", "train/train_get.py")
train_dmd = _script("train_dmd", "train/train_dmd.py")
sample = _script("sample", "train/sample.py")
quality = _script("quality", "bench/quality.py")
generate = _script("generate", "data_gen/generate.py")


def _paths(model, seeds, settings):
    """The images of `seeds` through the code path of each script that samples a GET."""
    cpu = torch.device("cpu")
    inputs = draw_inputs(seeds, model, label_policy=settings.label_policy, rng_device=settings.rng_device)
    return {
        "train_get grid": train_get.grid_images(model, seeds, settings, cpu),
        "train_dmd grid/eval": train_dmd.generate(model, seeds, settings, cpu, sigmas=(80.0,))[0],
        "sample.py": sample.generate(model, seeds, settings.label_policy, settings.rng_device, cpu)[0],
        "bench/quality.py": quality.one_step_samples(model, inputs, 2, cpu)[0].float(),
    }


def test_the_image_of_a_seed_is_the_same_in_every_script_and_batch():
    torch.manual_seed(0)
    model = GET_models["GET-XXS/2"](input_size=8, num_classes=3).eval()
    settings = PairSettings(teacher={"name": "t"}, tensors=tensor_spec(3, 8, 3), label_dim=3, label_policy="random")
    batch = _paths(model, [5, 17, 3, 42, 8], settings)
    alone = _paths(model, [17], settings)
    reference = alone["sample.py"][0]
    for name in batch:
        # Same seed, same checkpoint: the same inputs, so bit for bit the same image, alone or in a batch.
        torch.testing.assert_close(alone[name][0], reference, rtol=0, atol=0)
        torch.testing.assert_close(batch[name][1], reference, rtol=0, atol=0)
    # The inputs themselves are bit-identical alone and in a batch.
    a, b = draw_inputs([17], model), draw_inputs([5, 17, 3], model)
    for x, y in ((a.latents, b.latents), (a.labels, b.labels), (a.z0, b.z0)):
        assert torch.equal(x[0], y[1])


def test_balanced_labels_reach_every_reader(tmp_path):
    # Pairs of a conditional teacher with --labels balanced and an infinite S_max.
    assert generate.main(generate.parse_args(["--outdir", str(tmp_path / "pairs"), "--teacher", "mixture-demo-cond",
                                              "--seeds", "0-7", "--steps", "3", "--labels", "balanced",
                                              "--grid", "0"])) == 0
    ds = PairDataset(tmp_path / "pairs")
    assert ds.manifest["settings"]["labels"] == "balanced" and ds.manifest["settings"]["sampler"]["S_max"] == "inf"
    settings = ds.settings
    assert settings.label_policy == "balanced" and settings.rng_device == "cpu"
    assert settings.sampler == SamplerSettings(num_steps=3) and math.isinf(settings.sampler.kwargs()["S_max"])
    pairs = ds.get_batch(range(8))
    assert pairs["label"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    # Every reader draws the pairs' seeds as the pairs were drawn: the same noise and the same labels.
    model = GET_models["GET-XXS/2"](input_size=16, num_classes=4).eval()
    inputs = draw_inputs(range(8), model, label_policy=settings.label_policy, rng_device=settings.rng_device)
    assert torch.equal(inputs.latents, pairs["noise"]) and torch.equal(inputs.labels, pairs["label"])
    _, labels = train_dmd.generate(model, list(range(8)), settings, torch.device("cpu"), sigmas=(80.0,))
    assert labels.tolist() == pairs["label"].tolist()
    # The settings read back equal the settings written, and write the same manifest entry.
    assert PairSettings.from_dict(ds.manifest["settings"]).to_dict() == {
        k: v for k, v in ds.manifest["settings"].items() if k not in ("seeds", "num_pairs", "shard_size")}
