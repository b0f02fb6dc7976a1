"""GET with a noise-level input (noise_cond=True): identity at initialisation, loading, conditioning, gradients."""

import logging

import pytest
import torch

from get.models import GET, GET_models
from get.noise_cond import NoiseEmbedder, as_sigma, c_noise


def _tiny(**kw):
    return GET_models["GET-XXS/2"](**{"input_size": 8, **kw})


def _pair(num_classes=0):
    """An unconditioned GET with a non-zero output layer and a noise-conditioned GET holding the same weights."""
    plain = _tiny(num_classes=num_classes)
    torch.nn.init.normal_(plain.final_layer.linear.weight, std=0.1)
    cond = _tiny(num_classes=num_classes, noise_cond=True)
    missing, unexpected = cond.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("noise_embedder.") for k in missing) and len(missing) == 4
    return plain, cond


def _seed(seed=1):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_identical_outputs_at_initialisation(num_classes):
    plain, cond = _pair(num_classes)
    x = torch.randn(3, 3, 8, 8)
    y = torch.tensor([0, 2, 1]) if num_classes else None
    reference = plain(x, y, generator=_seed())
    for sigma in (torch.tensor([0.002, 1.0, 80.0]), 80.0, torch.tensor(0.5)):
        assert torch.equal(cond(x, y, generator=_seed(), sigma=sigma), reference)
    for a, b in zip(plain.trajectory(x, y, generator=_seed()), cond.trajectory(x, y, generator=_seed(), sigma=3.0)):
        assert torch.equal(a, b)


def test_same_seed_gives_the_same_base_weights():
    torch.manual_seed(0)
    plain = _tiny(num_classes=2)
    torch.manual_seed(0)
    cond = _tiny(num_classes=2, noise_cond=True)
    own = cond.state_dict()
    assert all(torch.equal(value, own[key]) for key, value in plain.state_dict().items())
    assert list(own)[-4:] == ["noise_embedder.mlp.0.weight", "noise_embedder.mlp.0.bias",
                              "noise_embedder.mlp.2.weight", "noise_embedder.mlp.2.bias"]


def test_embedding_changes_outputs_once_trained():
    _, cond = _pair(num_classes=3)
    torch.nn.init.normal_(cond.noise_embedder.mlp[2].weight, std=0.5)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    low = cond(x, y, generator=_seed(), sigma=0.01)
    high = cond(x, y, generator=_seed(), sigma=80.0)
    assert (low - high).abs().max() > 1e-3
    # Per-sample sigma: row b depends on sigma[b] only.
    mixed = cond(x, y, generator=_seed(), sigma=torch.tensor([0.01, 80.0]))
    torch.testing.assert_close(mixed[0], low[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1], high[1], rtol=1e-5, atol=1e-6)


def test_gradients_reach_the_noise_embedder():
    _, cond = _pair()
    x = torch.randn(2, 3, 8, 8)
    cond.trajectory(x, generator=_seed(), sigma=torch.tensor([0.3, 7.0]))[-1].square().sum().backward()
    # The last layer is zero, so only it gets a gradient at first; one step later the first layer gets one too.
    assert cond.noise_embedder.mlp[2].weight.grad.abs().sum() > 0
    assert cond.noise_embedder.mlp[2].bias.grad.abs().sum() > 0
    with torch.no_grad():
        cond.noise_embedder.mlp[2].weight.add_(0.01 * torch.randn_like(cond.noise_embedder.mlp[2].weight))
    cond.zero_grad()
    cond.trajectory(x, generator=_seed(), sigma=torch.tensor([0.3, 7.0]))[-1].square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cond.noise_embedder.parameters())


def test_unconditioned_checkpoint_loads_into_noise_cond_and_names_the_new_keys(tmp_path, caplog):
    plain, _ = _pair(num_classes=3)
    plain.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="get.models"):
        cond = GET.from_pretrained(tmp_path, noise_cond=True)
    new = ["noise_embedder.mlp.0.weight", "noise_embedder.mlp.0.bias", "noise_embedder.mlp.2.weight",
           "noise_embedder.mlp.2.bias"]
    assert cond.noise_cond and cond.new_keys == new
    assert all(key in caplog.text for key in new)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([2, 0])
    assert torch.equal(cond(x, y, generator=_seed(), sigma=2.0), plain(x, y, generator=_seed()))
    # Saved again, the noise-conditioned model round-trips with every key (strictly) and its config.
    torch.nn.init.normal_(cond.noise_embedder.mlp[2].weight, std=0.1)
    cond.save_pretrained(tmp_path / "cond")
    loaded = GET.from_pretrained(tmp_path / "cond")
    assert loaded.config == cond.config and loaded.config["noise_cond"] is True and loaded.new_keys == []
    assert torch.equal(loaded(x, y, generator=_seed(), sigma=2.0), cond(x, y, generator=_seed(), sigma=2.0))


def test_official_checkpoint_loads_into_noise_cond(tmp_path):
    plain, _ = _pair()
    path = tmp_path / "official.pth"
    torch.save({"args": {"model": "GET-XXS/2", "input_size": 8}, "model": plain.state_dict()}, path)
    cond = GET.from_pretrained(path, noise_cond=True)
    assert len(cond.new_keys) == 4
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(cond(x, generator=_seed(), sigma=80.0), plain(x, generator=_seed()))


def test_strict_loading_is_otherwise_unchanged(tmp_path):
    plain, cond = _pair()
    assert GET.from_pretrained(_saved(plain, tmp_path / "plain")).new_keys == []
    # A noise-conditioned file missing part of its embedder is refused, even when noise_cond=True is repeated.
    sd = cond.state_dict()
    del sd["noise_embedder.mlp.2.bias"]
    cond.save_pretrained(tmp_path / "broken", state_dict=sd)
    for overrides in ({}, {"noise_cond": True}):
        with pytest.raises(RuntimeError, match="noise_embedder.mlp.2.bias"):
            GET.from_pretrained(tmp_path / "broken", **overrides)
    # A noise-conditioned file into a model without the input: the embedder keys are unexpected.
    with pytest.raises(RuntimeError, match="Unexpected key.*noise_embedder"):
        GET.from_pretrained(_saved(cond, tmp_path / "cond"), noise_cond=False)
    # A file without noise_cond in its config but with part of an embedder is not completed silently.
    sd = cond.state_dict()
    del sd["noise_embedder.mlp.0.bias"]
    plain.save_pretrained(tmp_path / "partial_embedder", state_dict=sd)
    with pytest.raises(RuntimeError, match="noise_embedder.mlp.0.bias"):
        GET.from_pretrained(tmp_path / "partial_embedder", noise_cond=True)
    # Another missing key is still an error with noise_cond=True.
    sd = plain.state_dict()
    del sd["qkv_inj.weight"]
    plain.save_pretrained(tmp_path / "partial", state_dict=sd)
    with pytest.raises(RuntimeError, match="qkv_inj.weight"):
        GET.from_pretrained(tmp_path / "partial", noise_cond=True)


def _saved(model, folder):
    model.save_pretrained(folder)
    return folder


def test_sigma_required_or_refused_with_clear_errors():
    plain, cond = _pair()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"noise_cond=True\): pass sigma"):
        cond(x)
    with pytest.raises(ValueError, match=r"noise_cond=True\): pass sigma"):
        cond.trajectory(x)
    with pytest.raises(ValueError, match=r"sigma was given but this GET has no noise-level input \(noise_cond=False\)"):
        plain(x, sigma=1.0)
    with pytest.raises(ValueError, match=r"sigma must have shape \(\) or \(2,\), got \(3,\)"):
        cond(x, sigma=torch.ones(3))
    with pytest.raises(ValueError, match=r"sigma must be finite and > 0, got \[1.0, 0.0\]"):
        cond(x, sigma=torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="sigma must be a number or a tensor"):
        cond(x, sigma=[1.0, 2.0])
    with pytest.raises(ValueError, match="noise_cond must be True or False, got 1"):
        _tiny(noise_cond=1)


def test_noise_embedder_closed_form():
    torch.manual_seed(0)
    emb = NoiseEmbedder(8, frequency_channels=4).double()
    torch.nn.init.normal_(emb.mlp[2].weight)
    sigma = torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64)
    u = torch.log(sigma) / 4  # c_noise
    freqs = torch.tensor([1.0, 0.01], dtype=torch.float64)  # (1/10000)^(i/2), i = 0, 1
    features = torch.cat([torch.cos(u[:, None] * freqs), torch.sin(u[:, None] * freqs)], dim=1)
    h = torch.nn.functional.silu(features @ emb.mlp[0].weight.T + emb.mlp[0].bias)
    expected = (h @ emb.mlp[2].weight.T + emb.mlp[2].bias)[:, None]  # (3, 1, 24)
    torch.testing.assert_close(emb(sigma), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(c_noise(sigma), u)
    assert as_sigma(2, 3, torch.device("cpu"), torch.float32, "t").tolist() == [2.0, 2.0, 2.0]
