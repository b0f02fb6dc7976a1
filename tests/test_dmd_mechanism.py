"""DMD's mechanism end to end on a problem with exact scores: a learnable Gaussian generator x = mu + s * z trained only
by the library's distribution-matching loss (get.distill.dmd.distribution_matching_loss: noising, real/fake denoisers,
the eq. 8 normalisation and the surrogate) reaches the target's mean and variance; with the sign flipped it does not.

Both denoisers are closed-form posterior means: for data N(m, v) per coordinate, D(x; sigma) = m + v / (v + sigma^2)
(x - m). The fake denoiser is that of the generator's current N(mu, s^2), i.e. a perfectly trained fake score, so any
failure to converge is the gradient's (sign, per-sample normalisation, surrogate scaling), not the critic's.
"""

import torch

from get.distill import dmd

TARGET_MEAN = torch.tensor([0.5, -0.3, 0.2, 0.0], dtype=torch.float64)  # (D,)
TARGET_STD = torch.tensor([0.3, 0.5, 0.8, 0.2], dtype=torch.float64)  # (D,)
BATCH, STEPS = 256, 800
# The surrogate's gradient in x is g / x.numel() (mean reduction), so a parameter's gradient is mean_b(g dx/dtheta) / D
# (D = numel per sample); plain SGD with lr = LR * D moves it by LR * mean_b(g dx/dtheta). A sum reduction would make
# this step B * D times larger and diverge; an unnormalised g (no eq. 8 weight) would barely move at small sigma.
LR = 0.3


def gaussian_denoiser(mean: torch.Tensor, var: torch.Tensor):
    """Exact EDM denoiser of data N(mean, diag(var)) on (B, 1, 1, D) inputs: m + var / (var + sigma^2) (x - m)."""

    def denoise(x, sigma, class_labels=None):
        s2 = sigma.to(x.dtype).view(-1, 1, 1, 1) ** 2  # (B, 1, 1, 1)
        return mean + var / (var + s2) * (x - mean)  # (B, 1, 1, D)

    return denoise


def train_gaussian_generator(sign: float, steps: int = STEPS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the generator after ``steps`` SGD updates on sign * DMD's loss, from N(0, 1)."""
    torch.manual_seed(seed)
    dim = TARGET_MEAN.numel()
    mu = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    log_s = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([mu, log_s], lr=LR * dim)
    real = gaussian_denoiser(TARGET_MEAN, TARGET_STD ** 2)
    grid = dmd.karras_sigmas()
    low, high = dmd.index_range(len(grid), *dmd.DMDSettings().dm_range)
    for _ in range(steps):
        fake = gaussian_denoiser(mu.detach(), log_s.detach().exp() ** 2)  # the generator's exact denoiser
        z = torch.randn(BATCH, 1, 1, dim, dtype=torch.float64)
        x = mu + log_s.exp() * z  # (B, 1, 1, D)
        sigma = dmd.sample_sigma(BATCH, grid, low, high)  # (B,)
        loss, _ = dmd.distribution_matching_loss(x, real, fake, sigma, torch.randn_like(x))
        opt.zero_grad()
        (sign * loss).backward()
        opt.step()
    return mu.detach(), log_s.detach().exp()


def test_dmd_gradient_matches_a_gaussian_target():
    mean, std = train_gaussian_generator(+1.0)
    torch.testing.assert_close(mean, TARGET_MEAN, rtol=0, atol=1e-3)
    torch.testing.assert_close(std, TARGET_STD, rtol=1e-2, atol=0)


def test_flipped_sign_moves_away_from_the_target():
    """Negative control: ascending the same loss must not converge (the test above can fail)."""
    mean, std = train_gaussian_generator(-1.0)
    start_error = (TARGET_MEAN.abs() + (1 - TARGET_STD).abs()).sum()  # distance of N(0, 1) from the target
    error = ((mean - TARGET_MEAN).abs() + (std - TARGET_STD).abs()).sum()
    assert not torch.isfinite(error) or error > 2 * start_error, (mean, std)
