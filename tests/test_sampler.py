"""EDM sampler: Karras steps, Heun accuracy against exact and fine-step solutions, per-seed stochastic noise."""

from types import SimpleNamespace

import pytest
import torch

from get.edm.sampler import check_sampler_settings, edm_sampler, edm_time_steps, sampler_sigma_range
from get.mixture import MixtureTeacher
from get.seeds import StackedRandomGenerator, draw_inputs

# EDM's Karras schedule (docs/EDM.md), rounded to 6 decimals.
KARRAS_18 = [80.0, 57.585985, 40.785574, 28.374585, 19.352453, 12.910082, 8.400935, 5.315195, 3.256822, 1.92334,
             1.088171, 0.585348, 0.296442, 0.139516, 0.059947, 0.022935, 0.007528, 0.002, 0.0]


def test_time_steps_match_edm():
    t = edm_time_steps(18)
    assert t.dtype == torch.float64 and t.shape == (19,)
    torch.testing.assert_close(t, torch.tensor(KARRAS_18, dtype=torch.float64), atol=6e-7, rtol=0)
    torch.testing.assert_close(edm_time_steps(40)[:5], torch.tensor([80.0, 69.4509, 60.1174, 51.8803, 44.6302],
                                                                    dtype=torch.float64), atol=6e-5, rtol=0)
    grid = edm_time_steps(1000).flip(0)[1:]  # ascending 1000-point grid
    torch.testing.assert_close(grid[[0, 20, 980, 999]], torch.tensor([0.002, 0.0032316, 72.0539, 80.0],
                                                                     dtype=torch.float64), atol=6e-5, rtol=0)
    with pytest.raises(ValueError, match="sigma_min"):
        edm_time_steps(18, sigma_min=1.0, sigma_max=0.5)


def _exact_gaussian_teacher_map(teacher, latents, sigma_max=80.0, sigma_min=0.002):
    """The exact probability-flow map of a single Gaussian from sigma_max to sigma_min, then D(.; sigma_min) (what
    EDM's final Euler step to sigma = 0 computes): along each eigenvector of Sigma the ODE dx/dsigma = (x - D)/sigma
    scales the deviation from mu by sqrt((lambda + sigma^2) / (lambda + sigma_max^2))."""
    lam, Q = torch.linalg.eigh(teacher.component_covariance(0))
    mu = teacher.means[0]
    y = (latents.double().reshape(len(latents), -1) * sigma_max - mu) @ Q
    x = mu + (y * ((lam + sigma_min ** 2) / (lam + sigma_max ** 2)).sqrt()) @ Q.T
    return teacher(x.reshape(latents.shape), torch.tensor(sigma_min, dtype=torch.float64))


def _rel_err(a, b):
    return float((a - b).square().mean().sqrt() / b.square().mean().sqrt())


def test_heun_matches_exact_gaussian_flow_with_second_order_convergence():
    teacher = MixtureTeacher(resolution=4, channels=1, num_components=1, rank=3, seed=3)
    latents = torch.randn(32, 1, 4, 4, dtype=torch.float64)
    exact = _exact_gaussian_teacher_map(teacher, latents)
    errors = [_rel_err(edm_sampler(teacher, latents, num_steps=n), exact) for n in (18, 36, 72)]
    assert errors[0] < 0.05
    for coarse, fine in zip(errors, errors[1:]):
        assert 3.0 < coarse / fine < 6.0  # Heun is second order: halving the step divides the error by ~4


def test_18_steps_close_to_fine_step_reference_on_the_mixture():
    teacher = MixtureTeacher.preset("demo")
    latents = draw_inputs(range(4), teacher).latents
    reference = edm_sampler(teacher, latents, num_steps=128)
    out = edm_sampler(teacher, latents)
    assert out.dtype == torch.float64 and out.shape == latents.shape
    assert _rel_err(out, reference) < 0.05
    assert _rel_err(edm_sampler(teacher, latents, num_steps=36), reference) < _rel_err(out, reference) / 3
    # The teacher map lands on the data: final images are likely under the mixture.
    assert teacher.responsibilities(out.float(), sigma=0.0).max(1).values.min() > 0.5


class _CountingTeacher:
    """Wraps a teacher to count evaluations and record the noise levels it is called with."""

    def __init__(self, teacher):
        self.teacher, self.sigmas = teacher, []
        self.sigma_min, self.sigma_max, self.label_dim = teacher.sigma_min, teacher.sigma_max, teacher.label_dim
        self.round_sigma = teacher.round_sigma

    def __call__(self, x, sigma, class_labels=None):
        self.sigmas.append(float(sigma))
        return self.teacher(x, sigma, class_labels)


def test_nfe_and_schedule():
    counting = _CountingTeacher(MixtureTeacher(resolution=4, channels=1, num_components=2, rank=1))
    edm_sampler(counting, torch.randn(2, 1, 4, 4))
    assert len(counting.sigmas) == 35  # 2N - 1
    assert counting.sigmas[0] == 80.0 and counting.sigmas[-1] == pytest.approx(0.002)


def test_stochastic_sampler_per_seed_and_moments():
    teacher = MixtureTeacher(resolution=4, channels=1, num_components=1, rank=2, seed=1)
    seeds = list(range(2000))
    kwargs = dict(num_steps=32, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)
    rnd = StackedRandomGenerator("cpu", seeds)
    latents = rnd.randn([len(seeds), 1, 4, 4])
    out = edm_sampler(teacher, latents, randn_like=rnd.randn_like, **kwargs)
    # Same seeds in another batch composition give the same samples (per-seed noise streams).
    sub = [1999, 3, 17]
    rnd_sub = StackedRandomGenerator("cpu", sub)
    out_sub = edm_sampler(teacher, rnd_sub.randn([3, 1, 4, 4]), randn_like=rnd_sub.randn_like, **kwargs)
    torch.testing.assert_close(out_sub, out[sub], rtol=0, atol=1e-10)
    # The churn really is random: a different stream changes the samples.
    other = edm_sampler(teacher, latents, randn_like=torch.randn_like, **kwargs)
    assert (other - out).abs().max() > 1e-3
    # Samples have the data's moments (exact mean and covariance of the Gaussian teacher).
    x = out.reshape(len(seeds), -1)
    std = teacher.covariance().diagonal().sqrt()
    assert ((x.mean(0) - teacher.mean().reshape(-1)).abs() / std).max() < 5 / len(seeds) ** 0.5 + 0.03
    cov = teacher.covariance()
    assert float((torch.cov(x.T) - cov).norm() / cov.norm()) < 0.15  # measured 0.09 (exact samples: ~0.03)
    # Negative control: 20 % too much churn noise inflates the covariance far beyond that.
    wrong = edm_sampler(teacher, latents, randn_like=StackedRandomGenerator("cpu", seeds).randn_like,
                        **dict(kwargs, S_noise=1.2)).reshape(len(seeds), -1)
    assert float((torch.cov(wrong.T) - cov).norm() / cov.norm()) > 0.3


def test_int_labels_are_one_hot_for_the_net():
    teacher = MixtureTeacher(resolution=4, channels=1, num_components=3, rank=1, conditional=True)
    latents = torch.randn(3, 1, 4, 4)
    labels = torch.tensor([0, 2, 1])
    by_index = edm_sampler(teacher, latents, labels, num_steps=6)
    by_one_hot = edm_sampler(teacher, latents, torch.nn.functional.one_hot(labels, 3).float(), num_steps=6)
    torch.testing.assert_close(by_index, by_one_hot, rtol=0, atol=0)
    resp = teacher.responsibilities(by_index, sigma=0.0)
    assert resp.argmax(1).tolist() == [0, 2, 1]  # one component per class: samples land in their class
    with pytest.raises(ValueError, match="class_labels"):
        edm_sampler(teacher, latents, torch.tensor([0, 3, 1]), num_steps=4)


def test_settings_are_checked_before_sampling():
    teacher = MixtureTeacher(resolution=4, channels=1, num_components=2, rank=1)
    latents = torch.randn(2, 1, 4, 4)
    for kwargs, message in [(dict(S_churn=-1), "S_churn must be >= 0, got -1"), (dict(rho=0), "rho must be > 0"),
                            (dict(rho=-7), "rho must be > 0, got -7"), (dict(sigma_min=-1), "sigma_min must be > 0"),
                            (dict(S_noise=-1), "S_noise must be >= 0"), (dict(S_min=3, S_max=2), "S_min must be <="),
                            (dict(num_steps=1), "num_steps must be an integer >= 2"),
                            (dict(S_min=float("nan")), "S_min must be a number")]:
        with pytest.raises(ValueError, match=message):
            edm_sampler(teacher, latents, **kwargs)
    with pytest.raises(ValueError, match="rho must be > 0"):
        edm_time_steps(18, rho=0)
    with pytest.raises(ValueError, match="--S-churn must be >= 0"):
        check_sampler_settings(S_churn=-1, names={"S_churn": "--S-churn"})
    # The interval left inside the teacher's range is named with the values given and that range.
    vp_like = SimpleNamespace(sigma_min=0.001, sigma_max=152.0)
    assert sampler_sigma_range(vp_like, 0.002, 500.0) == (0.002, 152.0)
    with pytest.raises(ValueError, match=r"sigma_min 200.0 and sigma_max 300.0 leave no interval inside the "
                                         r"teacher's noise range \[0.001, 152.0\]"):
        sampler_sigma_range(vp_like, 200.0, 300.0)
