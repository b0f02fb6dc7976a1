"""The analytic Gaussian-mixture teacher: exact denoiser, densities, sampling and moments against independent
float64 references (dense linear algebra, Monte Carlo), conditioning, presets, the Teacher protocol, load_teacher."""

import math

import pytest
import torch

from get.mixture import MixtureTeacher
from get.teachers import Teacher, load_teacher, save_teacher


@pytest.fixture(scope="module")
def small():
    """D = 2 * 4 * 4 = 32, three components of rank 2, conditional with 3 classes."""
    return MixtureTeacher(resolution=4, channels=2, num_components=3, rank=2, mean_scale=0.5, factor_scale=0.4,
                          diag_scale=0.1, seed=7, conditional=True)


def _dense_terms(teacher, x, sigma, log_prior=None):
    """log pi_k N(x; mu_k, Sigma_k + sigma^2 I) and per-component posterior means by dense solves (float64)."""
    D = teacher.dim
    x = x.double().reshape(len(x), D)
    sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(len(x))
    log_joint, means = [], []
    for k in range(teacher.num_components):
        cov = teacher.component_covariance(k)[None] + sigma[:, None, None] ** 2 * torch.eye(D, dtype=torch.float64)
        v = x - teacher.means[k]
        log_joint.append(torch.distributions.MultivariateNormal(teacher.means[k], cov).log_prob(x)
                         + teacher.log_weights[k])
        means.append(x - sigma[:, None] ** 2 * torch.linalg.solve(cov, v[..., None]).squeeze(-1))
    log_joint = torch.stack(log_joint, 1)  # (B, K)
    if log_prior is not None:
        log_joint = log_joint + log_prior
    resp = torch.softmax(log_joint, 1)
    denoised = torch.einsum("bk,kbd->bd", resp, torch.stack(means))
    return log_joint, resp, denoised


def test_woodbury_denoiser_matches_dense_float64(small):
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    for sigma in [torch.tensor(0.7, dtype=torch.float64), torch.tensor([0.0, 0.01, 0.3, 1.0, 5.0, 80.0],
                                                                        dtype=torch.float64)]:
        log_joint, resp, denoised = _dense_terms(small, x, sigma)
        torch.testing.assert_close(small(x, sigma).reshape(6, -1), denoised, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(small.log_prob(x, sigma), torch.logsumexp(log_joint, 1), rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(small.responsibilities(x, sigma), resp, rtol=1e-9, atol=1e-12)
    # float32 in, float32 out (computed in float64).
    out32 = small(x.float(), 0.5)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), small(x, 0.5), rtol=1e-6, atol=1e-6)


def test_class_conditioning(small):
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    one_hot = torch.eye(3, dtype=torch.float64)[[2, 0, 1]]
    _, _, dense = _dense_terms(small, x, 0.8, log_prior=torch.log(one_hot))
    torch.testing.assert_close(small(x, 0.8, one_hot).reshape(3, -1), dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(small(x, 0.8, torch.tensor([2, 0, 1])), small(x, 0.8, one_hot), rtol=0, atol=0)
    # One component per class: the posterior puts all its mass on the labelled component.
    assert small.responsibilities(x, 0.8, one_hot).argmax(1).tolist() == [2, 0, 1]
    # No label = the marginal; a uniform row is the marginal too.
    torch.testing.assert_close(small(x, 0.8, torch.ones(3, 3)), small(x, 0.8), rtol=1e-12, atol=1e-12)
    for bad in [torch.zeros(3, 3), -torch.eye(3), torch.ones(3, 4)]:
        with pytest.raises(ValueError, match="class_labels"):
            small(x, 0.8, bad)
    grouped = MixtureTeacher(resolution=4, channels=1, num_components=4, rank=1, conditional=True, num_classes=2)
    assert grouped.label_dim == 2 and grouped.class_of.tolist() == [0, 1, 0, 1]
    _, labels = grouped.sample(50, generator=torch.Generator().manual_seed(0), class_labels=torch.ones(50).long())
    assert labels.tolist() == [1] * 50


def test_denoiser_matches_monte_carlo_posterior_mean():
    """E[y | y + sigma n = x] by self-normalised importance sampling with exact data samples y_i ~ p."""
    teacher = MixtureTeacher(resolution=2, channels=2, num_components=3, rank=2, seed=11)  # D = 8
    g = torch.Generator().manual_seed(1)
    y, _ = teacher.sample(200_000, generator=g)
    y = y.reshape(len(y), -1)
    for sigma in [0.3, 1.0]:
        x = y[:4] + sigma * torch.randn(4, teacher.dim, generator=g, dtype=torch.float64)
        log_w = -((x[:, None, :] - y[None, 4:]) ** 2).sum(-1) / (2 * sigma ** 2)  # (4, N)
        w = torch.softmax(log_w, dim=1)
        estimate = w @ y[4:]  # (4, D)
        ess = 1 / (w ** 2).sum(1)  # effective sample size per query
        assert float(ess.min()) > 500
        se = ((w[:, :, None] ** 2 * (y[None, 4:] - estimate[:, None]) ** 2).sum(1)).sqrt()  # (4, D) standard errors
        exact = teacher(x.reshape(4, 2, 2, 2), sigma).reshape(4, -1)
        assert float(((exact - estimate).abs() / se).max()) < 5.0


def test_sampling_moments_match_exact_mean_and_covariance(small):
    g = torch.Generator().manual_seed(3)
    n = 40_000
    x, labels = small.sample(n, generator=g)
    assert x.shape == (n, 2, 4, 4) and x.dtype == torch.float64 and labels.dtype == torch.int64
    cov = small.covariance()
    std = cov.diagonal().sqrt()
    z = (x.mean(0).reshape(-1) - small.mean().reshape(-1)) / (std / math.sqrt(n))
    assert float(z.abs().max()) < 5
    emp = torch.cov(x.reshape(n, -1).T)
    assert float((emp - cov).norm() / cov.norm()) < 0.03
    # Label frequencies follow the uniform component weights.
    freq = torch.bincount(labels, minlength=3).double() / n
    assert float((freq - 1 / 3).abs().max()) < 0.02
    # Per-class moments.
    x1, labels1 = small.sample(20_000, generator=g, class_labels=torch.full((20_000,), 1))
    assert labels1.unique().tolist() == [1]
    torch.testing.assert_close(x1.mean(0), small.mean(class_label=1), atol=0.03, rtol=0)
    torch.testing.assert_close(small.covariance(class_label=1), small.component_covariance(1), atol=1e-12, rtol=0)


def test_covariance_and_log_prob_of_the_mixture(small):
    """Law of total covariance against a direct sum; the data log-density (sigma = 0) against dense Gaussians."""
    mu = small.means
    total = sum(small.component_covariance(k) / 3 + torch.outer(mu[k], mu[k]) / 3 for k in range(3))
    m = mu.mean(0)
    torch.testing.assert_close(small.covariance(), total - torch.outer(m, m), rtol=1e-12, atol=1e-12)
    x, _ = small.sample(5, generator=torch.Generator().manual_seed(0))
    log_joint, _, _ = _dense_terms(small, x, 0.0)
    torch.testing.assert_close(small.log_prob(x), torch.logsumexp(log_joint, 1), rtol=1e-10, atol=1e-9)


def test_parameters_fixed_by_seed_and_presets():
    a, b = MixtureTeacher(resolution=8, seed=5), MixtureTeacher(resolution=8, seed=5)
    assert a.identity()["sha256"] == b.identity()["sha256"]
    assert a.identity()["sha256"] != MixtureTeacher(resolution=8, seed=6).identity()["sha256"]
    demo = MixtureTeacher.preset("demo")
    assert (demo.resolution, demo.channels, demo.num_components, demo.label_dim) == (16, 3, 4, 0)
    default = MixtureTeacher.preset("default", conditional=True)
    assert (default.resolution, default.channels, default.num_components, default.label_dim) == (32, 3, 10, 10)
    assert default.name == "mixture-cond"
    # Data scale close to EDM's sigma_data = 0.5, and the means are smooth images (small pixel-to-pixel jumps).
    std = float(default.covariance().diagonal().mean().sqrt())
    assert 0.3 < std < 0.7
    means = default.component_means()
    assert float((means[..., 1:] - means[..., :-1]).abs().mean()) < 0.3 * float(means.abs().mean())
    with pytest.raises(ValueError, match="unknown preset"):
        MixtureTeacher.preset("huge")
    for bad in [dict(rank=-1), dict(diag_scale=0.0), dict(num_components=0), dict(num_classes=2),
                dict(conditional=True, num_classes=11)]:
        with pytest.raises(ValueError):
            MixtureTeacher(**bad)


def test_protocol_bottleneck_and_gradients(small):
    assert isinstance(small, Teacher)
    assert small.sigma_min == 0 and small.sigma_max == math.inf and small.label_dim == 3
    x = torch.randn(2, 2, 4, 4, requires_grad=True)
    feats = small.bottleneck(x, torch.tensor([0.5, 2.0]))
    assert feats.shape == (2, 2 + 3, 1, 1) and feats.dtype == torch.float32
    feats.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    identity = small.identity()
    assert identity["config"]["class_name"] == "MixtureTeacher" and len(identity["sha256"]) == 64
    with pytest.raises(ValueError, match="x must be"):
        small(torch.randn(2, 3, 4, 4), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        small(torch.randn(2, 2, 4, 4), torch.tensor([1.0, 2.0, 3.0]))


def test_load_teacher_specs_and_saved_folder(tmp_path):
    teacher = load_teacher("mixture-demo-cond")
    assert teacher.name == "mixture-demo-cond" and teacher.label_dim == 4
    save_teacher(teacher, tmp_path / "t")
    again = load_teacher(str(tmp_path / "t"))
    assert again.identity() == teacher.identity()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(again(x, 1.0, torch.tensor([0, 3])), teacher(x, 1.0, torch.tensor([0, 3])),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a mixture preset"):
        load_teacher("mixture-huge")
