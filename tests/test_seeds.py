"""The seeds contract (get.seeds): EDM's seed syntax, per-seed latents, labels, sampler noise and z0."""

import pytest
import torch

from get.mixture import MixtureTeacher
from get.models import GET_models
from get.seeds import StackedRandomGenerator, derived_seed, draw_inputs, format_seeds, parse_seeds


def test_parse_seeds():
    assert parse_seeds("0-3,10,20-21") == [0, 1, 2, 3, 10, 20, 21]
    assert parse_seeds(" 7 ") == [7]
    assert len(parse_seeds("0-49999")) == 50000
    for bad in ["", "a", "3-1", "1,,2", "-1", "1-2-3"]:
        with pytest.raises(ValueError, match="seeds"):
            parse_seeds(bad)


def test_inputs_follow_edm_draw_order_and_ignore_the_batch():
    teacher = MixtureTeacher(resolution=4, channels=2, num_components=3, rank=1, conditional=True)
    inputs = draw_inputs([5, 2**32 + 7, 11], teacher)
    latents, labels = inputs.latents, inputs.labels
    assert latents.dtype == torch.float32 and latents.shape == (3, 2, 4, 4) and labels.dtype == torch.int64
    # EDM's order per seed: generator seeded with seed mod 2^32, latent randn([C, H, W]) then randint(label_dim).
    g = torch.Generator().manual_seed(7)
    torch.testing.assert_close(latents[1], torch.randn(2, 4, 4, generator=g), rtol=0, atol=0)
    assert int(labels[1]) == int(torch.randint(3, size=[], generator=g))
    # A seed's latent and label do not depend on its batch.
    alone = draw_inputs([11], teacher)
    torch.testing.assert_close(alone.latents[0], latents[2], rtol=0, atol=0)
    assert int(alone.labels[0]) == int(labels[2])
    # The sampler's noise continues each seed's generator after its latent and label (EDM's generate.py).
    torch.testing.assert_close(inputs.noise.randn([3, 5])[1], torch.randn(5, generator=g), rtol=0, atol=0)
    # Balanced labels cycle through the classes.
    balanced = draw_inputs(range(6), teacher, label_policy="balanced").labels
    assert balanced.tolist() == [0, 1, 2, 0, 1, 2]
    assert draw_inputs([1], MixtureTeacher(resolution=4, channels=1, num_components=2, rank=1)).labels is None
    with pytest.raises(ValueError, match="label_policy"):
        draw_inputs([1], teacher, label_policy="uniform")
    with pytest.raises(ValueError, match="number of seeds"):
        StackedRandomGenerator("cpu", [1, 2]).randn([3, 4])


def test_format_seeds_inverts_parse_seeds():
    for s in ["0-999999", "0-9,12,20-29", "5", "7,3-6,2"]:
        assert format_seeds(parse_seeds(s)) == s
    assert format_seeds(parse_seeds("7,3,4-6,8")) == "7,3-6,8"


def test_z0_is_per_seed_and_independent_of_the_label_policy():
    model = GET_models["GET-XXS/2"](input_size=8, num_classes=3)
    inputs = draw_inputs([4, 9], model)
    assert inputs.z0.shape == (2, 16, 64) and inputs.z0.dtype == torch.float32
    g = torch.Generator().manual_seed(derived_seed(9, 1))
    torch.testing.assert_close(inputs.z0[1], torch.randn(16, 64, generator=g), rtol=0, atol=0)
    torch.testing.assert_close(inputs.z0_stream.randn([2, 3])[1], torch.randn(3, generator=g), rtol=0, atol=0)
    balanced = draw_inputs([9], model, label_policy="balanced")
    torch.testing.assert_close(balanced.z0[0], inputs.z0[1], rtol=0, atol=0)
    assert balanced.labels.tolist() == [0]
    assert draw_inputs([1], GET_models["ViT-B/2"](hidden_size=64, num_heads=2, depth=1, input_size=8)).z0 is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_generators_without_cuda_are_a_clear_error():
    with pytest.raises(ValueError, match="CUDA generators"):
        draw_inputs([0], MixtureTeacher(resolution=4, channels=1, num_components=2, rank=1), rng_device="cuda")


def test_seeds_out_of_range_are_named():
    assert parse_seeds(f"{2**63 - 1}") == [2**63 - 1]
    for bad, message in [(str(2**64), f"{2**64} in '{2**64}' exceeds the largest seed"),
                         (f"5-{2**63}", f"{2**63} in '5-{2**63}' exceeds"), ("-1", "'-1'.*seeds must be >= 0"),
                         ("3,-2-4", "'-2-4'.*seeds must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            parse_seeds(bad)
