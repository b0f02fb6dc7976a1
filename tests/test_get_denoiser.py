"""GETDenoiser: EDM preconditioning around a noise-conditioned GET, exactly the one-step GET at sigma_max."""

import math

import pytest
import torch

from get.distill.get_denoiser import GETDenoiser
from get.edm.sampler import edm_sampler
from get.models import GET_models
from get.seeds import StackedRandomGenerator, draw_inputs


def _gets(num_classes=3, trained_embedding=False):
    """A one-step GET with a non-zero output layer and a noise-conditioned copy of its weights."""
    plain = GET_models["GET-XXS/2"](input_size=8, num_classes=num_classes)
    torch.nn.init.normal_(plain.final_layer.linear.weight, std=0.1)
    cond = GET_models["GET-XXS/2"](input_size=8, num_classes=num_classes, noise_cond=True)
    cond.load_state_dict(plain.state_dict(), strict=False)
    if trained_embedding:
        torch.nn.init.normal_(cond.noise_embedder.mlp[2].weight, std=0.3)
    return plain, cond


def _seed(seed=5):
    return torch.Generator().manual_seed(seed)


def test_sigma_max_reproduces_the_one_step_get_bitwise():
    _, cond = _gets(trained_embedding=True)
    D = GETDenoiser(cond)
    z, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    x_T = z.double() * 80.0  # pure noise at sigma_max, formed in float64 as the samplers do
    out = D(x_T, 80.0, y, generator=_seed())
    assert out.dtype == torch.float64
    assert torch.equal(out, cond(z, y, generator=_seed(), sigma=80.0).double())
    # With the untrained noise input (a one-step GET just loaded with noise_cond=True) it is the one-step GET itself.
    plain, fresh = _gets()
    D0 = GETDenoiser(fresh)
    assert torch.equal(D0(x_T, torch.full((4,), 80.0), y, generator=_seed()).float(), plain(z, y, generator=_seed()))
    # A float32 x_T = 80 z rounds; the identity then holds to rounding.
    torch.testing.assert_close(D(80.0 * z, 80.0, y, generator=_seed()), cond(z, y, generator=_seed(), sigma=80.0),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sigma", [0.002, 0.3, 2.0, 79.0])
def test_preconditioning_closed_form(sigma):
    _, cond = _gets(trained_embedding=True)
    sd, sM = 0.5, 80.0
    D = GETDenoiser(cond, sigma_data=sd, sigma_max=sM)
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([2, 1])
    c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
    c_out = sigma * sd / math.sqrt(sigma ** 2 + sd ** 2)
    c_in_edm = 1 / math.sqrt(sigma ** 2 + sd ** 2)
    c_in = c_in_edm * math.sqrt(sM ** 2 + sd ** 2) / sM  # EDM's c_in rescaled by a constant ~ 1 + 2e-5
    u = c_in * x
    F_y = cond(u.float(), y, generator=_seed(), sigma=sigma).double()  # the GET's image output
    c_skip_M, c_out_M = sd ** 2 / (sM ** 2 + sd ** 2), sM * sd / math.sqrt(sM ** 2 + sd ** 2)
    F = (F_y - c_skip_M * sM * u) / c_out_M  # GET's output read in EDM's F-units at sigma_max
    expected = c_skip * x + c_out * F
    torch.testing.assert_close(D(x, sigma, y, generator=_seed()), expected, rtol=1e-5, atol=1e-6)
    assert D.c_in(torch.tensor(sigma, dtype=torch.float64)).item() == pytest.approx(c_in, rel=1e-12)
    assert c_in / c_in_edm == pytest.approx(1 + 2e-5, rel=1e-6)


def test_low_noise_is_near_identity_at_initialisation():
    _, cond = _gets()
    D = GETDenoiser(cond)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    image = cond(x, y, generator=_seed(), sigma=1.0)  # sigma-independent before training
    # D - x = (c_out(sigma)/c_out(sigma_M)) y + O(sigma^2) x; c_out/c_out_M ~ sigma / sigma_d.
    assert (D(x, 0.002, y, generator=_seed()) - x).abs().max() < 0.005 * image.abs().max() + 1e-4


def test_runs_in_edm_sampler_with_per_seed_noise():
    _, cond = _gets(trained_embedding=True)
    D = GETDenoiser(cond).eval()
    seeds = [3, 4, 5]
    inputs = draw_inputs(seeds, D)
    latents, labels = inputs.latents, inputs.labels
    rnd = StackedRandomGenerator("cpu", seeds)
    images = edm_sampler(D, latents, labels, randn_like=rnd.randn_like, num_steps=4)
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.float64 and torch.isfinite(images).all()
    unconditional = GETDenoiser(_gets(num_classes=0)[1])
    assert edm_sampler(unconditional, latents, None, num_steps=3).shape == (3, 3, 8, 8)


def test_labels_indices_and_one_hot_agree():
    _, cond = _gets(trained_embedding=True)
    D = GETDenoiser(cond)
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([2, 0, 1])
    by_index = D(x, torch.tensor([0.5, 3.0, 40.0]), y, generator=_seed())
    by_row = D(x, torch.tensor([0.5, 3.0, 40.0]), torch.nn.functional.one_hot(y, 3).float(), generator=_seed())
    assert by_index.shape == x.shape and by_index.dtype == x.dtype
    assert torch.equal(by_index, by_row)


def test_differentiable_path_reaches_get_and_input():
    _, cond = _gets(trained_embedding=True)
    D = GETDenoiser(cond)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = D(x, torch.tensor([0.4, 9.0]), torch.tensor([1, 2]), differentiable=True, generator=_seed())
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0
    assert cond.noise_embedder.mlp[0].weight.grad.abs().sum() > 0 and cond.qkv_inj.weight.grad.abs().sum() > 0
    with torch.no_grad():  # the evaluation solve does not track the equilibrium
        assert D(x, 9.0, torch.tensor([1, 2]), generator=_seed()).shape == x.shape


def test_clear_errors():
    plain, cond = _gets()
    with pytest.raises(ValueError, match=r"get_model must be a GET with noise_cond=True, got GET\(noise_cond=False\)"):
        GETDenoiser(plain)
    with pytest.raises(ValueError, match="get_model must be a GET with noise_cond=True, got Linear"):
        GETDenoiser(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="sigma_data must be a finite number > 0, got 0"):
        GETDenoiser(cond, sigma_data=0)
    with pytest.raises(ValueError, match="sigma_min must be < sigma_max, got sigma_min=90"):
        GETDenoiser(cond, sigma_min=90.0)
    D = GETDenoiser(cond)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"one-hot rows \(2, 3\).*got torch.float32 \(2, 3\)"):
        D(x, 1.0, torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="pass class_labels"):
        D(x, 1.0)
    with pytest.raises(ValueError, match=r"GETDenoiser: sigma must be finite and > 0, got \[-1.0, -1.0\]"):
        D(x, -1.0, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"x must be a \(B, C, R, R\) tensor, got \(3, 8, 8\)"):
        D(x[0], 1.0, torch.tensor([0]))
    unconditional = GETDenoiser(_gets(num_classes=0)[1])
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(x, 1.0, torch.eye(2))


def test_protocol_attributes():
    _, cond = _gets()
    D = GETDenoiser(cond, sigma_max=60.0)
    assert (D.resolution, D.channels, D.label_dim, D.sigma_min, D.sigma_max) == (8, 3, 3, 0.002, 60.0)
    assert torch.equal(D.round_sigma(torch.tensor([1.5])), torch.tensor([1.5]))
    ident = D.identity()
    assert ident["config"]["get"]["noise_cond"] is True and len(ident["sha256"]) == 64
