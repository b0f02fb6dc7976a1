"""Moment Matching building blocks: the t -> sigma map, the ancestral posterior, Algorithm 1, the losses, the JVP."""

import math

import pytest
import torch
from torch import nn

from get.distill.get_denoiser import GETDenoiser
from get.distill.moment_matching import (
    auxiliary_loss,
    generator_loss,
    mm_loss_weight,
    mm_sampler,
    sample_posterior,
    sample_times,
    sampler_sigmas,
    sigma_of_t,
    teacher_loss_directional_derivative,
)
from get.edm.sampler import edm_time_steps
from get.models import GET_models
from get.seeds import StackedRandomGenerator

F64 = torch.float64

# A 1-D two-component Gaussian mixture and its exact posterior-mean denoiser (the oracle of these tests), float64.
PI, MU, VAR = (torch.tensor(v, dtype=F64) for v in ([0.3, 0.7], [-1.0, 0.8], [0.04, 0.16]))
DATA_MEAN = float((PI * MU).sum())
DATA_VAR = float((PI * (VAR + MU ** 2)).sum()) - DATA_MEAN ** 2


def mixture_denoiser(z, sigma, class_labels=None):
    """E[x | x + sigma eps = z] for the mixture: sum_k r_k(z) (mu_k + v_k / (v_k + sigma^2) (z - mu_k))."""
    z64, total = z.to(F64), VAR + torch.as_tensor(sigma, dtype=F64) ** 2  # (K,)
    log_joint = torch.log(PI) - 0.5 * (torch.log(2 * math.pi * total) + (z64[..., None] - MU) ** 2 / total)
    resp = torch.softmax(log_joint, dim=-1)  # (..., K)
    return (resp * (MU + VAR / total * (z64[..., None] - MU))).sum(-1).to(z.dtype)


def chain_moments(denoiser, num_steps, n=3000):
    """Mean and variance of Algorithm 1's output with a 1-D denoiser, by quadrature in float64: the density of z_t
    is carried on a grid; each step maps grid point z to N(a z + (1 - a) D(z), sigma_s^2 (1 - a)),
    a = sigma_s^2 / sigma_t^2."""
    sig = sampler_sigmas(num_steps)
    grid = torch.linspace(-10 * sig[0], 10 * sig[0], n, dtype=F64)  # z_1 ~ N(0, sigma_max^2)
    weight = torch.exp(-0.5 * (grid / sig[0]) ** 2)
    weight = weight / weight.sum()
    for s_t, s_s in zip(sig[:-1], sig[1:]):
        a = (s_s / s_t) ** 2
        mean_j, std = a * grid + (1 - a) * denoiser(grid, s_t), s_s * torch.sqrt(1 - a)  # (n,), scalar
        mean = (weight * mean_j).sum()
        spread = ((weight * (mean_j ** 2 + std ** 2)).sum() - mean ** 2).sqrt()
        new = torch.linspace(mean - 10 * spread, mean + 10 * spread, n, dtype=F64)
        assert new[1] - new[0] < std / 4  # the grid resolves the transition kernel
        density = (weight * torch.exp(-0.5 * ((new[:, None] - mean_j) / std) ** 2)).sum(1)
        grid, weight = new, density / density.sum()
    x = denoiser(grid, sig[-1])
    mean = float((weight * x).sum())
    return mean, float((weight * x ** 2).sum()) - mean ** 2


# ---- the t -> sigma map ----------------------------------------------------------------------------------------


def test_sigma_of_t_is_the_karras_schedule():
    assert sigma_of_t(1.0).item() == 80.0 and sigma_of_t(0.0).item() == pytest.approx(0.002, rel=1e-12)
    assert sigma_of_t(torch.tensor([1.0]), sigma_max=100.0).item() == 100.0  # (100^(1/7))^7 alone rounds
    N = 18
    t = 1 - torch.arange(N, dtype=F64) / (N - 1)  # EDM's step i is t = 1 - i/(N-1)
    torch.testing.assert_close(sigma_of_t(t), edm_time_steps(N)[:-1], rtol=1e-12, atol=0)
    s = sigma_of_t(torch.linspace(0, 1, 101, dtype=F64))
    assert (s[1:] > s[:-1]).all()
    for k in (1, 2, 4, 8):
        sig = sampler_sigmas(k)
        assert sig.shape == (k,) and sig[0].item() == 80.0
        torch.testing.assert_close(sig, sigma_of_t(torch.tensor([(k - i) / k for i in range(k)], dtype=F64)))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\], got min -0.5"):
        sigma_of_t(torch.tensor([-0.5, 0.5]))
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1.*got 0"):
        sampler_sigmas(0)


# ---- the ancestral posterior -----------------------------------------------------------------------------------


def _condition(cov, observed):
    """Gaussian conditioning of a zero-mean joint: the regression coefficients of the first variable on the
    ``observed`` ones and its conditional variance, by solving the normal equations."""
    coef = torch.linalg.solve(cov[observed][:, observed], cov[0, observed])
    return coef, cov[0, 0] - cov[0, observed] @ coef


@pytest.mark.parametrize("sigma_t,sigma_s", [(80.0, 39.0), (2.0, 1.0), (0.5, 0.01), (1.0, 1.0)])
def test_posterior_is_the_forward_process_bridge(sigma_t, sigma_s):
    # Given x: z_s = x + sigma_s e1 and z_t = z_s + sqrt(sigma_t^2 - sigma_s^2) e2 (the Markov forward process).
    cov = torch.tensor([[sigma_s ** 2, sigma_s ** 2], [sigma_s ** 2, sigma_t ** 2]], dtype=F64)  # (z_s, z_t) | x
    (coef,), var = _condition(cov, [1])
    x, z_t = torch.randn(5, 1, 2, 2, dtype=F64), torch.randn(5, 1, 2, 2, dtype=F64) * sigma_t
    mean = sample_posterior(z_t, x, sigma_t, sigma_s, torch.zeros_like(z_t))
    torch.testing.assert_close(mean, x + coef * (z_t - x), rtol=1e-12, atol=1e-12)
    ones = sample_posterior(z_t, x, sigma_t, sigma_s, torch.ones_like(z_t))
    torch.testing.assert_close(ones - mean, torch.full_like(mean, math.sqrt(var)), rtol=1e-10, atol=1e-12)


def test_posterior_keeps_the_forward_marginals():
    # Monte Carlo: z_t ~ q(z_t | x), then z_s from the library must have z_s - x ~ N(0, sigma_s^2), Cov(z_s, z_t) =
    # sigma_s^2 (the joint of the forward process).
    g = torch.Generator().manual_seed(0)
    n, sigma_t, sigma_s, x = 200_000, 3.0, 1.2, 0.7
    z_t = x + sigma_t * torch.randn(n, 1, 1, 1, generator=g, dtype=F64)
    z_s = sample_posterior(z_t, torch.full_like(z_t, x), sigma_t, sigma_s, torch.randn(z_t.shape, generator=g,
                                                                                     dtype=F64))
    e_s, e_t = (z_s - x).flatten(), (z_t - x).flatten()
    assert abs(e_s.mean().item()) < 5 * sigma_s / math.sqrt(n)
    assert e_s.var().item() == pytest.approx(sigma_s ** 2, rel=5 * math.sqrt(2 / n))
    assert (e_s * e_t).mean().item() == pytest.approx(sigma_s ** 2, rel=0.02)


def test_ancestral_step_with_the_exact_denoiser_of_gaussian_data():
    # Data x ~ N(m, v): the true reverse conditional p(z_s | z_t) comes from conditioning the joint (z_s, z_t) of
    # z = x + sigma eps. Algorithm 1's step with x_tilde = E[x | z_t] has its mean exactly, and its variance minus
    # (1 - a)^2 Var(x | z_t), a = sigma_s^2 / sigma_t^2: plugging in the posterior mean drops the posterior spread.
    m, v, sigma_t, sigma_s = 0.3, 0.49, 1.5, 0.6
    cov = torch.tensor([[v + sigma_s ** 2, v + sigma_s ** 2], [v + sigma_s ** 2, v + sigma_t ** 2]], dtype=F64)
    (coef,), exact_var = _condition(cov, [1])  # p(z_s | z_t) = N(m + coef (z_t - m), exact_var)
    (gain,), x_var = _condition(torch.tensor([[v, v], [v, v + sigma_t ** 2]], dtype=F64), [1])  # p(x | z_t)
    z_t = m + torch.randn(6, 1, 1, 1, dtype=F64) * math.sqrt(v + sigma_t ** 2)
    x_tilde = m + gain * (z_t - m)  # E[x | z_t]
    mean = sample_posterior(z_t, x_tilde, sigma_t, sigma_s, torch.zeros_like(z_t))
    torch.testing.assert_close(mean, m + coef * (z_t - m), rtol=1e-12, atol=1e-12)
    std = (sample_posterior(z_t, x_tilde, sigma_t, sigma_s, torch.ones_like(z_t)) - mean)[0].item()
    a = sigma_s ** 2 / sigma_t ** 2
    assert std ** 2 + (1 - a) ** 2 * x_var.item() == pytest.approx(exact_var.item(), rel=1e-12)


def test_posterior_errors():
    z = torch.zeros(2, 1, 1, 1)
    with pytest.raises(ValueError, match=r"need 0 < sigma_s <= sigma_t, got sigma_t=\[1.0\], sigma_s=\[2.0\]"):
        sample_posterior(z, z, 1.0, 2.0, z)
    with pytest.raises(ValueError, match=r"sigma_s must be a scalar or have shape \(2,\), got \(3,\)"):
        sample_posterior(z, z, 1.0, torch.ones(3), z)


# ---- Algorithm 1 -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8])
def test_sampler_output_moments_match_the_exact_chain(num_steps):
    # With the mixture's exact denoiser as g, the output's mean and variance equal those of the same chain computed
    # by quadrature. (They are not the data's: the posterior mean is not a moment-matched generator; k = 1 returns
    # about E[x] for every latent. Moment Matching trains g so that the output has the data distribution.)
    torch.manual_seed(0)
    n = 20_000
    out = mm_sampler(mixture_denoiser, torch.randn(n, 1, 1, 1), num_steps=num_steps).flatten()
    mean, var = chain_moments(mixture_denoiser, num_steps)
    fourth = ((out - out.mean()) ** 4).mean().item()
    assert abs(out.mean().item() - mean) < 5 * math.sqrt(var / n) + 1e-9
    assert abs(out.var().item() - var) < 5 * math.sqrt(max(fourth - var ** 2, 0) / n) + 1e-9
    assert var < DATA_VAR and (num_steps > 1 or var < 1e-3 * DATA_VAR)
    if num_steps == 1:  # one step returns E[x | z_1] ~ E[x]
        assert mean == pytest.approx(DATA_MEAN, abs=1e-3)


@pytest.mark.parametrize("num_steps", [1, 4, 8])
def test_quadrature_oracle_against_the_linear_gaussian_recursion(num_steps):
    # Control for chain_moments: for Gaussian data N(m, v) the exact denoiser is linear, m + v / (v + sigma^2) (z - m),
    # so the chain stays Gaussian and its mean and variance follow a closed-form recursion.
    m, v = 0.2, 0.3

    def gaussian_denoiser(z, sigma, class_labels=None):
        return m + v / (v + torch.as_tensor(sigma, dtype=F64) ** 2) * (z - m)

    sig = sampler_sigmas(num_steps).tolist()
    mean, var = 0.0, sig[0] ** 2  # z_1 ~ N(0, sigma_max^2)
    for s_t, s_s in zip(sig[:-1], sig[1:]):
        a, gain = s_s ** 2 / s_t ** 2, v / (v + s_t ** 2)
        mean = a * mean + (1 - a) * (m + gain * (mean - m))
        var = (a + (1 - a) * gain) ** 2 * var + s_s ** 2 * (1 - a)
    gain = v / (v + sig[-1] ** 2)
    expected = (m + gain * (mean - m), gain ** 2 * var)
    assert chain_moments(gaussian_denoiser, num_steps) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_sampler_is_batch_invariant_per_seed():
    seeds = [7, 11, 13, 17, 19]

    def run(batch_seeds, num_steps):
        rnd = StackedRandomGenerator("cpu", batch_seeds)
        latents = rnd.randn([len(batch_seeds), 1, 2, 2])
        return mm_sampler(mixture_denoiser, latents, num_steps=num_steps, randn_like=rnd.randn_like)

    for num_steps in (1, 4):
        together = run(seeds, num_steps)
        alone = torch.cat([run([seed], num_steps) for seed in seeds])
        assert torch.equal(together, alone)
        assert torch.equal(run(seeds[::-1], num_steps), together.flip(0))
    assert not torch.equal(run(seeds, 4), run(seeds, 2))


def test_one_step_with_a_get_denoiser_is_the_one_step_get():
    plain = GET_models["GET-XXS/2"](input_size=8, num_classes=2)
    torch.nn.init.normal_(plain.final_layer.linear.weight, std=0.1)
    cond = GET_models["GET-XXS/2"](input_size=8, num_classes=2, noise_cond=True)
    cond.load_state_dict(plain.state_dict(), strict=False)
    D = GETDenoiser(cond)
    latents, labels = torch.randn(3, 3, 8, 8), torch.tensor([1, 0, 1])
    z0 = torch.randn(3, 16, 64)

    def g(z, sigma, class_labels):
        return D(z, sigma, class_labels, z0=z0)

    assert torch.equal(mm_sampler(g, latents, labels, num_steps=1).float(), plain(latents, labels, z0=z0))
    four = mm_sampler(g, latents, labels, num_steps=4)
    assert four.shape == (3, 3, 8, 8) and torch.isfinite(four).all()


# ---- Algorithm 2: times and losses -------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [1, 2, 8])
def test_sample_times_bounds(num_steps):
    s, t = sample_times(50_000, num_steps, generator=torch.Generator().manual_seed(1))
    assert s.dtype == t.dtype == F64 and s.shape == t.shape == (50_000,)
    assert (s >= 0).all() and (s <= t).all() and (t <= 1).all() and (t - s <= 1 / num_steps).all()
    assert s.mean().item() == pytest.approx(0.5, abs=0.01)
    # t = min(s + U[0, 1/k], 1): clipped at 1 with probability 1/(2k).
    assert (t == 1).double().mean().item() == pytest.approx(1 / (2 * num_steps), abs=0.01)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1, got 0"):
        sample_times(4, 0)


def test_generator_loss_gradient_is_the_moment_matching_direction():
    sigma_s = torch.tensor([0.1, 2.0, 30.0], dtype=F64)
    x_tilde = torch.randn(3, 2, 4, 4, dtype=F64, requires_grad=True)
    aux, teacher = torch.randn(3, 2, 4, 4, dtype=F64), torch.randn(3, 2, 4, 4, dtype=F64)
    loss, grad = generator_loss(x_tilde, aux, teacher, sigma_s)
    loss.backward()
    w = (1 / sigma_s ** 2 + 1 / 0.25).view(-1, 1, 1, 1)  # EDM's lambda(sigma_s), sigma_data = 0.5
    torch.testing.assert_close(grad, w * (aux - teacher), rtol=1e-12, atol=0)
    torch.testing.assert_close(x_tilde.grad, w * (aux - teacher) / x_tilde.numel(), rtol=1e-12, atol=0)
    # The same gradient as the paper's loss w(s) x_tilde^T sg(g_phi - x_hat), mean-reduced.
    x2 = x_tilde.detach().requires_grad_(True)
    (w * x2 * (aux - teacher)).mean().backward()
    torch.testing.assert_close(x2.grad, x_tilde.grad, rtol=1e-12, atol=0)
    assert torch.equal(mm_loss_weight(sigma_s), w.flatten())
    # Sign: a small step against the gradient moves x_tilde towards where g_phi agrees with the teacher, i.e. it
    # lowers the paper's objective.
    x3 = x_tilde.detach() - 1e-3 * x_tilde.numel() * x_tilde.grad
    assert ((w * x3 * (aux - teacher)).sum() < (w * x_tilde.detach() * (aux - teacher)).sum()).item()


def test_auxiliary_loss_value_and_gradients():
    sigma_s = torch.tensor([0.5, 4.0], dtype=F64)
    aux = torch.randn(2, 1, 3, 3, dtype=F64, requires_grad=True)
    x_tilde = torch.randn(2, 1, 3, 3, dtype=F64, requires_grad=True)
    teacher = torch.randn(2, 1, 3, 3, dtype=F64, requires_grad=True)
    loss = auxiliary_loss(aux, x_tilde, teacher, sigma_s)
    w = (1 / sigma_s ** 2 + 4).view(-1, 1, 1, 1)
    expected = (w * ((x_tilde - aux) ** 2 + (teacher - aux) ** 2)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    loss.backward()
    torch.testing.assert_close(aux.grad, 2 * w * (2 * aux - x_tilde - teacher).detach() / aux.numel())
    assert x_tilde.grad is None and teacher.grad is None  # stop-gradients on both targets


# ---- Algorithm 3: the parameter-space directional derivative ---------------------------------------------------


class TinyDenoiser(nn.Module):
    """A small float64 denoiser x + MLP([x, ln sigma]) for (B, 1, 2, 2) images."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 4)).double()

    def forward(self, x, sigma, class_labels=None):
        features = torch.cat([x.flatten(1), sigma.log().view(-1, 1)], dim=1)  # (B, 5)
        return x + self.net(features).view_as(x)


def _teacher_loss(teacher, x_tilde, z_s, sigma_s):
    w = (1 / sigma_s ** 2 + 4).view(-1, 1, 1, 1)
    return (w * (x_tilde - teacher(z_s, sigma_s)) ** 2).mean()


def test_directional_derivative_matches_central_differences():
    torch.manual_seed(3)
    teacher = TinyDenoiser()
    x_tilde = torch.randn(4, 1, 2, 2, dtype=F64, requires_grad=True)
    sigma_s = torch.tensor([0.2, 0.7, 1.5, 6.0], dtype=F64)
    z_s = x_tilde.detach() + sigma_s.view(-1, 1, 1, 1) * torch.randn(4, 1, 2, 2, dtype=F64)
    names = ["net.0.weight", "net.2.bias"]  # a direction on part of the parameters
    v = {name: torch.randn_like(dict(teacher.named_parameters())[name]) for name in names}
    before = {k: p.clone() for k, p in teacher.state_dict().items()}
    loss, derivative = teacher_loss_directional_derivative(teacher, v, x_tilde, z_s, sigma_s)
    derivative.backward()  # before the finite differences below edit the parameters that the graph saved
    assert all(p.grad is None for p in teacher.parameters())

    h = 1e-5
    with torch.no_grad():
        torch.testing.assert_close(loss, _teacher_loss(teacher, x_tilde, z_s, sigma_s), rtol=1e-12, atol=0)
        params = dict(teacher.named_parameters())
        for name in names:
            params[name].add_(h * v[name])
        plus = _teacher_loss(teacher, x_tilde, z_s, sigma_s)
        for name in names:
            params[name].sub_(2 * h * v[name])
        minus = _teacher_loss(teacher, x_tilde, z_s, sigma_s)
        teacher.load_state_dict(before)
    torch.testing.assert_close(derivative, (plus - minus) / (2 * h), rtol=1e-7, atol=1e-10)
    assert all(torch.equal(p, before[k]) for k, p in teacher.state_dict().items())

    # Differentiable in x_tilde (Algorithm 3 backpropagates it into the generator): check along a random direction.
    u = torch.randn_like(x_tilde)

    def along(eps):
        return teacher_loss_directional_derivative(teacher, v, x_tilde.detach() + eps * u, z_s, sigma_s)[1]

    torch.testing.assert_close((x_tilde.grad * u).sum(), (along(h) - along(-h)) / (2 * h), rtol=1e-6, atol=1e-9)


def test_directional_derivative_errors():
    teacher = TinyDenoiser()
    x = torch.zeros(1, 1, 2, 2, dtype=F64)
    sigma = torch.ones(1, dtype=F64)
    with pytest.raises(ValueError, match="direction is empty"):
        teacher_loss_directional_derivative(teacher, {}, x, x, sigma)
    with pytest.raises(ValueError, match=r"direction\['net.9.weight'\] is not a parameter"):
        teacher_loss_directional_derivative(teacher, {"net.9.weight": torch.zeros(1)}, x, x, sigma)
    with pytest.raises(ValueError, match=r"direction\['net.2.bias'\] is torch.float64 \(3,\), the parameter "
                                         r"torch.float64 \(4,\)"):
        teacher_loss_directional_derivative(teacher, {"net.2.bias": torch.zeros(3, dtype=F64)}, x, x, sigma)
