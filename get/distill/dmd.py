"""Distribution Matching Distillation with a GET generator: DMD (Yin et al., CVPR 2024) and DMD2 (NeurIPS 2024).

Everything lives in EDM's space (docs/DISTILL.md): x_sigma = x + sigma * n, a denoiser D(x; sigma) predicts x_0,
and noise levels come from the 1000-point Karras grid (0.002 ... 80, rho = 7) stored ascending, so "t in [2%, 98%]"
is the grid index k in [20, 980]. Three networks take part:

* the generator G: a GET, unit Gaussian noise z (B, C, R, R) -> image; its training output is the last state of
  ``model.trajectory(z)`` (gradient-tracked), its samples ``model(z)``;
* the real score: the frozen teacher D_real (an EDM network or the analytic mixture teacher);
* the fake score: a trainable EDM denoiser D_fake of the generator's distribution (a copy of the teacher's network
  for EDM teachers; for the analytic teacher, which has no network, a small DDPM++ network warmed up by denoising
  score matching on the generator's samples before the generator moves; see :func:`make_fake_score`), plus for DMD2
  a classifier head on its bottleneck features (:class:`GANHead`).

Losses (pure functions below; the ``*_loss`` compositions are what the trainer calls):

* distribution matching (DMD eq. 7-8, alpha_t = 1 in EDM space): for x = G(z), k ~ U{20..980}, sigma = grid[k],
  x_sigma = x + sigma n, the per-pixel gradient g = (D_fake(x_sigma) - D_real(x_sigma)) / mean_{C,H,W}|x - D_real|
  (computed without gradient, NaN/inf replaced as in the official code), applied through the surrogate
  ``0.5 * mean((x - sg(x - g))^2)``, whose gradient in x is g / x.numel();
* fake-score denoising: EDM-weighted ``mean(lambda(sigma) (D_fake(x_sigma) - sg(x))^2)``, lambda = 1/sigma^2 +
  1/sigma_data^2, k ~ U{0..999};
* DMD regression on teacher pairs (z_ref, y_ref): ``0.25 * loss(G(z_ref), y_ref)``, LPIPS as in the paper
  (:func:`regression_loss`: missing LPIPS weights are an error, L1 only when asked for);
* DMD2 GAN (non-saturating, logits l = head(fake bottleneck of the noised image), k ~ U{0..999}): generator
  ``3e-3 * mean softplus(-l_fake)``, critic ``1e-2 * (mean softplus(l_fake) + mean softplus(-l_real))``;
* two time-scale update rule: the generator updates on iterations ``step % ttur == 0`` (DMD: ttur 1; DMD2: 5), the
  fake score (and head) on every iteration.

Multi-step generators (DMD2 §3.5). GET has no noise-level input, so a K-step GET generator is defined here by its
input: step 0 reads the unit latent z (= x_T / sigma_0 with x_T = 80 z), step k > 0 reads the previous x_0 re-noised
to sigma_k with fresh noise and divided by sigma_k, ``x_0 / sigma_k + n``, i.e. the noisy image in the same units as
the latent. Training with backward simulation picks a step s, runs steps 0..s-1 without gradient from pure noise and
trains step s on that input (:func:`backward_simulation`). This is an experimental option for GET; one step
(``sigmas = (80,)``) is the paper's setting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from get.edm.precond import PRECONDITIONERS, EDMPrecond
from get.edm.sampler import edm_time_steps
from get.losses import LOSSES, LPIPS_FILES, get_loss_fn, resolve_lpips_paths

__all__ = [
    "METHODS", "DMDSettings", "karras_sigmas", "index_range", "sample_sigma", "dm_gradient", "surrogate_loss",
    "distribution_matching_loss", "edm_loss_weight", "denoising_loss", "fake_score_loss", "gan_generator_loss",
    "gan_discriminator_loss", "GANHead", "gan_logits", "is_generator_turn", "generator_input", "backward_simulation",
    "sample_generator", "one_hot", "make_fake_score", "small_fake_score", "fake_score_from_teacher", "is_edm_network",
    "ResidualFakeScore", "FAKE_KINDS",
    "generator_loss", "critic_loss", "Critic", "bottleneck_shape", "regression_loss",
]

METHODS = ("dmd", "dmd2")
Score = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]  # D(x; sigma, one-hot labels)


# ----------------------------------------------------------------------------
# Settings.


@dataclass
class DMDSettings:
    """The knobs of DMD and DMD2, with the papers' values as defaults (docs/DISTILL.md).

    Attributes:
        method: 'dmd' (DM + regression, 1:1 updates) or 'dmd2' (DM + GAN, TTUR, no regression).
        ttur: fake-score updates per generator update (DMD 1, DMD2 5).
        reg_weight: lambda_reg of DMD's regression loss (0.25).
        gen_gan_weight: DMD2 generator GAN weight (3e-3, ImageNet-64).
        critic_gan_weight: DMD2 critic (discriminator) GAN weight (1e-2).
        dm_range: fractions (low, high) of the sigma grid for the distribution-matching loss (2%, 98%).
        num_sigmas, sigma_min, sigma_max, rho: the Karras grid.
        sigma_data: EDM's sigma_data for the denoising-loss weight (0.5).
        gen_sigmas: the generator's noise levels, descending; one entry = a one-step generator.
        backward_simulation: train step s of a multi-step generator on its own rollout (else always step 0).
    """

    method: str = "dmd"
    ttur: int | None = None
    reg_weight: float = 0.25
    gen_gan_weight: float = 3e-3
    critic_gan_weight: float = 1e-2
    dm_range: tuple[float, float] = (0.02, 0.98)
    num_sigmas: int = 1000
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5
    gen_sigmas: tuple[float, ...] = field(default=(80.0,))
    backward_simulation: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.ttur is None:
            self.ttur = 1 if self.method == "dmd" else 5
        if not isinstance(self.ttur, int) or self.ttur < 1:
            raise ValueError(f"ttur (fake updates per generator update) must be an integer >= 1, got {self.ttur!r}")
        low, high = self.dm_range
        if not 0 <= low <= high <= 1:
            raise ValueError(f"dm_range must satisfy 0 <= low <= high <= 1, got {self.dm_range}")
        for key in ("reg_weight", "gen_gan_weight", "critic_gan_weight"):
            if not math.isfinite(getattr(self, key)) or getattr(self, key) < 0:
                raise ValueError(f"{key} must be a finite number >= 0, got {getattr(self, key)!r}")
        self.gen_sigmas = tuple(float(s) for s in self.gen_sigmas)
        if not self.gen_sigmas or any(s <= 0 for s in self.gen_sigmas) or any(
                a <= b for a, b in zip(self.gen_sigmas, self.gen_sigmas[1:])):
            raise ValueError(f"gen_sigmas must be positive and strictly decreasing, got {self.gen_sigmas}")
        if self.backward_simulation and len(self.gen_sigmas) < 2:
            raise ValueError("backward_simulation needs a multi-step generator (at least two gen_sigmas)")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# ----------------------------------------------------------------------------
# Noise levels.


def karras_sigmas(num: int = 1000, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """The Karras grid (num,) float64, ascending as DMD2 stores it: index 0 -> sigma_min, num-1 -> sigma_max."""
    return edm_time_steps(num, sigma_min, sigma_max, rho, device=device)[:-1].flip(0)


def index_range(num: int, low: float, high: float) -> tuple[int, int]:
    """Inclusive grid indices for the fractions (low, high) of a num-point grid: (0.02, 0.98) of 1000 -> (20, 980)."""
    return round(low * num), min(round(high * num), num - 1)


def sample_sigma(batch: int, grid: torch.Tensor, low: int = 0, high: int | None = None) -> torch.Tensor:
    """sigma (B,) float32 = grid[k] with k ~ U{low, ..., high} (inclusive; default the whole grid), on grid's device."""
    high = len(grid) - 1 if high is None else high
    k = torch.randint(low, high + 1, (batch,), device=grid.device)  # (B,)
    return grid[k].to(torch.float32)


# ----------------------------------------------------------------------------
# Distribution matching.


def dm_gradient(x: torch.Tensor, denoised_real: torch.Tensor, denoised_fake: torch.Tensor) -> torch.Tensor:
    """DMD's per-pixel gradient g = (D_fake - D_real) / mean_{C,H,W}|x - D_real| (eq. 7-8, alpha = 1).

    Args:
        x: (B, C, H, W) generator output (clean).
        denoised_real, denoised_fake: (B, C, H, W) D_real(x_sigma), D_fake(x_sigma) of the noised x.

    Returns:
        (B, C, H, W) gradient on x; NaN -> 0 and +-inf -> the largest finite value, as the official code does.
    """
    weight = (x - denoised_real).abs().mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return torch.nan_to_num((denoised_fake - denoised_real) / weight)


def surrogate_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 * mean((x - sg(x - grad))^2), a scalar whose gradient in x is grad / x.numel()."""
    return 0.5 * F.mse_loss(x, (x - grad).detach())


def distribution_matching_loss(x: torch.Tensor, real_score: Score, fake_score: Score, sigma: torch.Tensor,
                               noise: torch.Tensor, class_labels: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """DMD's distribution-matching loss of generator outputs x at noise levels sigma.

    Args:
        x: (B, C, H, W) generator output, with gradient.
        real_score, fake_score: denoisers D(x_sigma; sigma, class_labels).
        sigma: (B,) noise levels (EDM units).
        noise: (B, C, H, W) unit Gaussian.
        class_labels: one-hot (B, label_dim) or None.

    Returns:
        (surrogate loss, the detached gradient g (B, C, H, W)).
    """
    with torch.no_grad():
        x0 = x.detach()
        x_sigma = x0 + sigma.to(x.dtype).view(-1, 1, 1, 1) * noise  # (B, C, H, W)
        d_real = real_score(x_sigma, sigma, class_labels).to(x.dtype)
        d_fake = fake_score(x_sigma, sigma, class_labels).to(x.dtype)
        grad = dm_gradient(x0, d_real, d_fake)
    return surrogate_loss(x, grad), grad


# ----------------------------------------------------------------------------
# DMD's regression on teacher pairs.


def regression_loss(name: str = "lpips", channels: int = 3, vgg_path: str | None = None,
                    lin_path: str | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """DMD's regression loss (pred, target) -> scalar on the pairs: LPIPS by default, as in the paper.

    lambda_reg = 0.25 was tuned for LPIPS, whose values are on another scale than L1's, so a missing LPIPS file is an
    error, never a silent switch to L1; another loss (one of get.losses.LOSSES) must be asked for by name. Move the
    returned module to the device (``.to(device)``) when it is one.

    Args:
        name: 'lpips' (the default) or another of get.losses.LOSSES ('l1', ...).
        channels: the images' channels (LPIPS needs 3).
        vgg_path, lin_path: the LPIPS weight files (default: torch hub's checkpoint folder, see
            get.losses.lpips_weight_paths).

    Raises:
        FileNotFoundError: LPIPS asked for and a weight file is missing; the message names every missing file and the
            flags that fix it.
        ValueError: an unknown loss, or LPIPS on images without 3 channels.
    """
    if name not in LOSSES:
        raise ValueError(f"--reg-loss {name!r}: DMD's regression loss must be one of {', '.join(LOSSES)}")
    if name != "lpips":
        return get_loss_fn(name)
    if channels != 3:
        raise ValueError(f"--reg-loss lpips needs 3-channel images, these have {channels}; choose another loss "
                         f"explicitly, e.g. --reg-loss l1 (and retune --reg-weight, whose 0.25 is for LPIPS)")
    paths = resolve_lpips_paths(vgg_path, lin_path)
    missing = [f"{what} at {path}" for path, what in zip(paths, LPIPS_FILES) if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(
            f"DMD's regression loss is LPIPS by default (--reg-weight 0.25 was tuned for it), but its weights are "
            f"missing: {'; '.join(missing)}. Place the files there or pass --lpips-vgg PATH / --lpips-lin PATH; or "
            f"choose another loss explicitly with --reg-loss l1 (and retune --reg-weight).")
    return get_loss_fn("lpips", vgg_path=paths[0], lin_path=paths[1])


# ----------------------------------------------------------------------------
# Fake-score denoising.


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM's loss weight lambda(sigma) = 1/sigma^2 + 1/sigma_data^2 = (sigma^2 + sigma_data^2)/(sigma sigma_data)^2."""
    return sigma.pow(-2) + 1.0 / sigma_data ** 2


def denoising_loss(denoised: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor,
                   sigma_data: float = 0.5) -> torch.Tensor:
    """mean over all elements of lambda(sigma) (denoised - target)^2; denoised, target (B, C, H, W), sigma (B,)."""
    weight = edm_loss_weight(sigma.to(denoised.dtype), sigma_data).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return (weight * (denoised - target).square()).mean()


def fake_score_loss(fake_score: Score, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                    class_labels: torch.Tensor | None = None, sigma_data: float = 0.5) -> torch.Tensor:
    """Denoising score matching of the fake score on the (detached) generator samples x: D_fake(x + sigma n) ~ x."""
    x = x.detach()
    x_sigma = x + sigma.to(x.dtype).view(-1, 1, 1, 1) * noise  # (B, C, H, W)
    return denoising_loss(fake_score(x_sigma, sigma, class_labels).to(x.dtype), x, sigma, sigma_data)


# ----------------------------------------------------------------------------
# DMD2's GAN on the fake network's bottleneck.


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss mean softplus(-l_fake)."""
    return F.softplus(-logits_fake).mean()


def gan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator loss mean softplus(l_fake) + mean softplus(-l_real)."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


class GANHead(nn.Module):
    """DMD2's classifier branch on the fake network's bottleneck features (docs/DISTILL.md).

    For an (C', 8, 8) bottleneck it is the official ``cls_pred_branch``: Conv 4x4 stride 2 pad 1 -> GroupNorm -> SiLU
    -> Conv 4x4 stride 4 -> GroupNorm -> SiLU -> Conv 1x1 to one logit. Other sizes get as many stride-2 4x4 convs as
    bring the side to at most 4, then a conv whose kernel and stride are the remaining side. Channels stay C';
    GroupNorm uses 32 groups like the official head when C' allows at least 4 channels per group, else the largest
    divisor of C' up to C' / 4: after the last conv each group normalises only its channels' single values, so a
    group of one channel would output a constant. PyTorch default initialisation, as the official code.

    Args:
        channels: C' of the features.
        resolution: side R' of the features.
    """

    def __init__(self, channels: int, resolution: int):
        super().__init__()
        if channels < 1 or resolution < 1:
            raise ValueError(f"GANHead: channels and resolution must be >= 1, got {channels}, {resolution}")
        self.config = dict(channels=channels, resolution=resolution)
        groups = max(g for g in range(1, min(32, max(1, channels // 4)) + 1) if channels % g == 0)
        layers, side = [], resolution
        while side > 4:
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.GroupNorm(groups, channels), nn.SiLU()]
            side = side // 2
        layers += [nn.Conv2d(channels, channels, side, stride=side), nn.GroupNorm(groups, channels), nn.SiLU(),
                   nn.Conv2d(channels, 1, 1)]
        self.cls_pred_branch = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (B,) of features (B, C', R', R')."""
        return self.cls_pred_branch(features.to(torch.float32)).flatten(1).squeeze(1)


def gan_logits(fake_score: nn.Module, head: GANHead, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
               class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B,) of images x (B, C, H, W) diffused to sigma (B,): head(fake_score.bottleneck(x + sigma n, sigma))."""
    x_sigma = x + sigma.to(x.dtype).view(-1, 1, 1, 1) * noise
    return head(fake_score.bottleneck(x_sigma, sigma, class_labels))


# ----------------------------------------------------------------------------
# Schedules and multi-step generation.


def is_generator_turn(step: int, ttur: int) -> bool:
    """Two time-scale update rule: the generator updates on iterations 0, ttur, 2 ttur, ...; the critic on all."""
    return step % ttur == 0


def generator_input(x0: torch.Tensor, sigma: float, noise: torch.Tensor) -> torch.Tensor:
    """A multi-step GET's input at noise level sigma: x0 re-noised to sigma and divided by it, x0 / sigma + n."""
    return x0 / sigma + noise


@torch.no_grad()
def backward_simulation(sample_fn: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor,
                        sigmas: Sequence[float], step: int,
                        randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like) -> torch.Tensor:
    """The input of generator step ``step`` on the generator's own rollout from pure noise (no gradient).

    Args:
        sample_fn: one generator step, unit-scale input (B, C, H, W) -> x_0.
        latents: (B, C, H, W) unit Gaussian: the input of step 0.
        sigmas: the generator's noise levels, descending.
        step: s in [0, len(sigmas)); steps 0..s-1 are run.
        randn_like: fresh noise for each re-noising.
    """
    if not 0 <= step < len(sigmas):
        raise ValueError(f"backward_simulation: step must be in [0, {len(sigmas)}), got {step}")
    inputs = latents
    for k in range(step):
        x0 = sample_fn(inputs)
        inputs = generator_input(x0, sigmas[k + 1], randn_like(x0))
    return inputs


@torch.no_grad()
def sample_generator(sample_fn: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor,
                     sigmas: Sequence[float] = (80.0,),
                     randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like) -> torch.Tensor:
    """Samples of a (multi-step) generator: x_0 of step 0 from the latents, then one re-noised step per sigma."""
    x0 = sample_fn(latents)
    for sigma in sigmas[1:]:
        x0 = sample_fn(generator_input(x0, sigma, randn_like(x0)))
    return x0


# ----------------------------------------------------------------------------
# Labels and fake scores.


def one_hot(labels: torch.Tensor | None, label_dim: int) -> torch.Tensor | None:
    """int64 class indices (B,) -> float32 one-hot rows (B, label_dim) as EDM passes labels; None when unconditional."""
    if labels is None or label_dim == 0:
        return None
    return F.one_hot(labels, label_dim).to(torch.float32)


def fake_score_from_teacher(teacher: nn.Module) -> nn.Module:
    """A trainable copy of an EDM teacher network (as DMD/DMD2 build mu_fake), without what sampling never uses.

    Dropout and label dropout are 0 (the fake score must model the generator, not regularise; DMD2 uses dropout 0).
    The augmentation embedding ``model.map_augment`` (augment_dim 9 in EDM's CIFAR-10 networks) is left out: the
    teacher is always called with augment_labels None, so that layer would never receive a gradient, and
    DistributedDataParallel without find_unused_parameters fails at the second critic forward on such a parameter.
    """
    config = teacher.config
    kwargs = dict(config["kwargs"], dropout=0.0, label_dropout=0.0, augment_dim=0)
    fake = PRECONDITIONERS[config["class_name"]](**kwargs)
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("model.map_augment.")}
    fake.load_state_dict(state)  # strict: every other tensor must match the rebuilt network
    return fake.to(next(teacher.parameters()).device).train().requires_grad_(True)


def small_fake_score(resolution: int, channels: int, label_dim: int = 0, model_channels: int = 32,
                     channel_mult: Sequence[int] = (1, 2, 2), num_blocks: int = 1) -> EDMPrecond:
    """A small DDPM++ (SongUNet) denoiser with EDM preconditioning, randomly initialised, no attention, dropout 0.

    Its output layer starts near zero (EDM's init), so it starts as D(x; sigma) ~ c_skip(sigma) x. Used for a teacher
    without a network to copy (the analytic teacher), as such (``kind='scratch'``) or as the correction of
    :class:`ResidualFakeScore`; either way it is first warmed up by denoising score matching on the generator's
    samples (the trainer's ``--fake-warmup`` iterations).
    """
    if resolution % (1 << (len(channel_mult) - 1)):
        raise ValueError(f"small_fake_score: resolution {resolution} is not divisible by "
                         f"2^{len(channel_mult) - 1} (channel_mult {tuple(channel_mult)})")
    return EDMPrecond(img_resolution=resolution, img_channels=channels, label_dim=label_dim,
                      model_type="SongUNet", model_channels=model_channels, channel_mult=list(channel_mult),
                      num_blocks=num_blocks, attn_resolutions=[], dropout=0.0, name="fake-score")


class ResidualFakeScore(nn.Module):
    """D_fake(x; sigma) = D_teacher(x; sigma) + c_out(sigma) F(c_in x; c_noise): a teacher plus a learned correction.

    The analytic teacher's counterpart of "the fake score starts as a copy of the teacher": the correction is a small
    EDM network whose output layer starts near zero, so D_fake = D_real at the start and the distribution-matching
    gradient is exactly zero until the correction has learnt how the generator's distribution differs from the
    teacher's (DSM on the generator's samples). Only the correction is trained and saved; the teacher stays frozen
    and outside the state dict. The GAN head reads the correction network's bottleneck.

    Args:
        teacher: the frozen teacher (any Teacher).
        net: the correction, an EDM-preconditioned network (:func:`small_fake_score`).
    """

    def __init__(self, teacher, net: EDMPrecond):
        super().__init__()
        self.net = net
        self._teacher = (teacher,)  # a tuple: not registered as a submodule (frozen, never saved)
        self.config = {"class_name": type(self).__name__, "teacher": teacher.name, "net": net.config}

    @property
    def teacher(self):
        return self._teacher[0]

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """D_fake(x; sigma) (B, C, R, R) float32."""
        sigma4 = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        c_skip = self.net.coefficients(sigma4)[0]
        with torch.no_grad():
            d_teacher = self.teacher(x, sigma, class_labels).to(torch.float32)
        return d_teacher + self.net(x, sigma, class_labels) - c_skip * x.to(torch.float32)

    def bottleneck(self, x: torch.Tensor, sigma: torch.Tensor | float,
                   class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net.bottleneck(x, sigma, class_labels)


def is_edm_network(teacher) -> bool:
    """Whether the teacher is one of get.edm's preconditioned networks (which the fake score can copy)."""
    config = getattr(teacher, "config", None)
    return isinstance(teacher, nn.Module) and isinstance(config, dict) and config.get("class_name") in PRECONDITIONERS


FAKE_KINDS = ("auto", "copy", "residual", "scratch")


def make_fake_score(teacher, kind: str = "auto", **small_kwargs) -> nn.Module:
    """The fake score for a teacher.

    Args:
        teacher: the real score.
        kind: 'copy' (a trainable copy of an EDM teacher network, the papers' choice), 'residual'
            (:class:`ResidualFakeScore`: the teacher plus a small zero-started correction), 'scratch' (a small network
            alone, :func:`small_fake_score`), or 'auto': 'copy' for EDM networks, 'scratch' otherwise (on the demo
            analytic teacher the small network alone learns the generator's denoiser faster than the correction,
            which must undo the teacher's sharp small-sigma behaviour: see the DMD section of the README).
        **small_kwargs: sizes of the small network (model_channels, channel_mult, num_blocks).
    """
    if kind not in FAKE_KINDS:
        raise ValueError(f"fake score kind must be one of {FAKE_KINDS}, got {kind!r}")
    if kind == "auto":
        kind = "copy" if is_edm_network(teacher) else "scratch"
    if kind == "copy":
        if not is_edm_network(teacher):
            raise ValueError(f"fake score 'copy' needs an EDM network teacher; {getattr(teacher, 'name', teacher)} "
                             f"is not one (use 'residual' or 'scratch')")
        return fake_score_from_teacher(teacher)
    net = small_fake_score(teacher.resolution, teacher.channels, teacher.label_dim, **small_kwargs)
    return ResidualFakeScore(teacher, net) if kind == "residual" else net


# ----------------------------------------------------------------------------
# The two objectives of one iteration.


def generator_loss(settings: DMDSettings, x: torch.Tensor, real_score: Score, fake_score: nn.Module,
                   grid: torch.Tensor, class_labels: torch.Tensor | None = None, head: GANHead | None = None,
                   regression: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The generator's loss on its outputs x: distribution matching, plus DMD's regression or DMD2's GAN term.

    Args:
        settings: method and weights.
        x: (B, C, H, W) generator output with gradient.
        real_score: the teacher D_real.
        fake_score: D_fake (its parameters should have requires_grad off during this step).
        grid: the ascending Karras grid (on x's device).
        class_labels: one-hot (B, label_dim) or None.
        head: DMD2's GANHead (required for dmd2).
        regression: DMD's regression loss value loss(G(z_ref), y_ref) (required for dmd), weighted here.

    Returns:
        (loss, detached stats: loss_dm, dm_grad_abs and loss_reg or loss_gan_g).
    """
    low, high = index_range(len(grid), *settings.dm_range)
    sigma = sample_sigma(x.shape[0], grid, low, high)
    loss_dm, grad = distribution_matching_loss(x, real_score, fake_score, sigma, torch.randn_like(x), class_labels)
    stats = {"loss_dm": loss_dm.detach(), "dm_grad_abs": grad.abs().mean()}
    loss = loss_dm
    if settings.method == "dmd":
        if regression is None:
            raise ValueError("generator_loss: DMD needs the regression loss on the pairs (regression=...)")
        loss = loss + settings.reg_weight * regression
        stats["loss_reg"] = regression.detach()
    else:
        if head is None:
            raise ValueError("generator_loss: DMD2 needs the GAN head (head=...)")
        logits = gan_logits(fake_score, head, x, sample_sigma(x.shape[0], grid), torch.randn_like(x), class_labels)
        loss_gan = gan_generator_loss(logits)
        loss = loss + settings.gen_gan_weight * loss_gan
        stats["loss_gan_g"] = loss_gan.detach()
    return loss, stats


def critic_loss(settings: DMDSettings, x_fake: torch.Tensor, fake_score: nn.Module, grid: torch.Tensor,
                labels_fake: torch.Tensor | None = None, head: GANHead | None = None,
                x_real: torch.Tensor | None = None, labels_real: torch.Tensor | None = None,
                real_score: Score | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The fake score's loss: EDM-weighted denoising of the generator samples, plus DMD2's discriminator term.

    Args:
        settings: method and weights.
        x_fake: (B, C, H, W) generator samples (detached here).
        fake_score: D_fake, trainable.
        grid: the ascending Karras grid.
        labels_fake: one-hot labels of x_fake or None.
        head: DMD2's GANHead (required for dmd2).
        x_real, labels_real: DMD2's real images (B', C, H, W) and their one-hot labels.
        real_score: if given, also report ``loss_real``, the same denoising loss of the real score on the same noised
            samples (no gradient): the fake score models the generator better than the teacher does once
            loss_fake < loss_real, i.e. its distribution-matching gradient carries signal rather than its own error.

    Returns:
        (loss, detached stats: loss_fake and, for DMD2, loss_gan_d, logits_real, logits_fake).
    """
    x_fake = x_fake.detach()
    sigma, noise = sample_sigma(x_fake.shape[0], grid), torch.randn_like(x_fake)
    loss = fake_score_loss(fake_score, x_fake, sigma, noise, labels_fake, settings.sigma_data)
    stats = {"loss_fake": loss.detach()}
    if real_score is not None:
        with torch.no_grad():
            stats["loss_real"] = fake_score_loss(real_score, x_fake, sigma, noise, labels_fake, settings.sigma_data)
    if settings.method == "dmd2":
        if head is None or x_real is None:
            raise ValueError("critic_loss: DMD2 needs the GAN head and real images (head=..., x_real=...)")
        x_real = x_real.to(x_fake.dtype)
        logits_fake = gan_logits(fake_score, head, x_fake, sample_sigma(x_fake.shape[0], grid),
                                 torch.randn_like(x_fake), labels_fake)
        logits_real = gan_logits(fake_score, head, x_real, sample_sigma(x_real.shape[0], grid),
                                 torch.randn_like(x_real), labels_real)
        loss_gan = gan_discriminator_loss(logits_real, logits_fake)
        loss = loss + settings.critic_gan_weight * loss_gan
        stats.update(loss_gan_d=loss_gan.detach(), logits_real=logits_real.detach().mean(),
                     logits_fake=logits_fake.detach().mean())
    return loss, stats


class Critic(nn.Module):
    """The fake score and (DMD2) its GAN head as one module whose forward is :func:`critic_loss`.

    One module and one forward per critic update, so DistributedDataParallel can wrap it although the loss calls the
    fake network several times (denoising, and the bottleneck of fake and real images).

    Args:
        settings: method and weights.
        fake: the fake-score network (an EDM preconditioned network with ``bottleneck``).
        head: the GANHead (DMD2) or None (DMD).
        grid: the ascending Karras grid; registered as a non-persistent buffer so it follows ``.to(device)``.
    """

    def __init__(self, settings: DMDSettings, fake: nn.Module, head: GANHead | None, grid: torch.Tensor):
        super().__init__()
        if (settings.method == "dmd2") != (head is not None):
            raise ValueError(f"Critic: {settings.method} {'needs' if head is None else 'takes no'} GAN head")
        self.settings, self.fake, self.head = settings, fake, head
        self.register_buffer("grid", grid, persistent=False)

    def forward(self, x_fake: torch.Tensor, labels_fake: torch.Tensor | None = None,
                x_real: torch.Tensor | None = None, labels_real: torch.Tensor | None = None,
                real_score: Score | None = None):
        return critic_loss(self.settings, x_fake, self.fake, self.grid, labels_fake, self.head, x_real, labels_real,
                           real_score)


def bottleneck_shape(fake: nn.Module, channels: int, resolution: int, label_dim: int = 0) -> tuple[int, int, int]:
    """(C', R', R') of the fake network's bottleneck features, from one forward on a zero image."""
    device = next(fake.parameters()).device
    x = torch.zeros(1, channels, resolution, resolution, device=device)
    labels = torch.zeros(1, label_dim, device=device) if label_dim else None
    with torch.no_grad():
        return tuple(fake.bottleneck(x, torch.ones(1, device=device), labels).shape[1:])
