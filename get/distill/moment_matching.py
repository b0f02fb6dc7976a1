"""Moment Matching (Salimans, Mensink, Heek & Hoogeboom, NeurIPS 2024): sampler, losses and the parameter-space JVP.

Everything is in EDM's (variance-exploding) space: z_t = x + sigma_t eps, a denoiser D(z; sigma, labels) predicts x.
The paper's time t in [0, 1] maps to a noise level by the continuous Karras map (:func:`sigma_of_t`)

    sigma(t) = (sigma_min^(1/rho) + t (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho,   rho = 7,

which is EDM's sampling schedule read as a function of t (EDM's step i of N is t = 1 - i/(N-1)): sigma(1) = sigma_max
(exactly), sigma(0) = sigma_min, and a uniform grid in t is EDM's Karras grid.

* Ancestral posterior (VE case of the paper's q(z_s | z_t, x), s < t): mean (sigma_s^2/sigma_t^2) z_t +
  (1 - sigma_s^2/sigma_t^2) x, variance sigma_s^2 (1 - sigma_s^2/sigma_t^2) (:func:`sample_posterior`).
* Algorithm 1 (:func:`mm_sampler`): k steps on t = 1, (k-1)/k, ..., 1/k from z_1 = sigma_max * latent; each step
  x_tilde = g(z_t, sigma_t); the last step returns x_tilde, the others draw z_s ~ q(z_s | z_t, x = x_tilde) with fresh
  noise. With a per-seed noise source a sample depends on its seed only.
* Algorithm 2 losses, for x_tilde = g_eta(z_t, sigma_t) (z_t by forward-diffusing data), z_s ~ q(z_s | z_t,
  sg(x_tilde)), the auxiliary denoiser's g_phi(z_s) and the teacher's x_hat(z_s): the auxiliary loss
  w(s) (|sg(x_tilde) - g_phi|^2 + |sg(x_hat) - g_phi|^2) (:func:`auxiliary_loss`) and the generator loss
  w(s) x_tilde^T sg(g_phi - x_hat) (:func:`generator_loss`), applied through DMD's surrogate
  0.5 mean((x_tilde - sg(x_tilde - grad))^2) with grad = w(s) (g_phi - x_hat): its gradient in x_tilde is
  grad / x_tilde.numel() (mean reduction, as every loss here). Descending it moves x_tilde against g_phi - x_hat:
  where the generator's own conditional mean E_g[x | z_s] (estimated by g_phi) exceeds the teacher's, the samples
  decrease, until g_phi = x_hat.
* Weighting w(s): the paper's exact choice is not available to us (no code was released); we use EDM's loss weight
  lambda(sigma_s) = 1/sigma_s^2 + 1/sigma_data^2, as an EDM re-implementation of Algorithm 2 does, which makes every
  term an EDM-weighted denoising error at the noise level sigma_s of z_s.
* Times (:func:`sample_times`): s ~ U[0, 1], t = min(s + U[0, 1/k], 1): t lies within one sampler step above s.
* Algorithm 3 building block (experimental, :func:`teacher_loss_directional_derivative`): the directional derivative
  v^T grad_theta of the teacher's denoising loss on student samples, by forward-mode JVP over the parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call, jvp

from get.distill.dmd import denoising_loss, edm_loss_weight, surrogate_loss

__all__ = [
    "sigma_of_t", "sampler_sigmas", "sample_posterior", "mm_sampler", "sample_times", "mm_loss_weight",
    "auxiliary_loss", "generator_loss", "teacher_loss_directional_derivative",
]

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]  # g(z; sigma, labels) -> x


def sigma_of_t(t: torch.Tensor | float, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
               ) -> torch.Tensor:
    """The continuous Karras map t in [0, 1] -> sigma in [sigma_min, sigma_max] (EDM units), float64, t's shape.

    Written as EDM writes its schedule (from sigma_max down); t = 1 gives sigma_max exactly.
    """
    if not 0 < sigma_min < sigma_max or rho <= 0:
        raise ValueError(f"sigma_of_t: need 0 < sigma_min < sigma_max and rho > 0, got sigma_min={sigma_min}, "
                         f"sigma_max={sigma_max}, rho={rho}")
    t = torch.as_tensor(t, dtype=torch.float64)
    if not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError(f"sigma_of_t: t must lie in [0, 1], got min {t.min().item()} max {t.max().item()}")
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    # (sigma_max^(1/rho))^rho rounds for most sigma_max (80 is exact, 100 is not): pin t = 1 to sigma_max, where a
    # GETDenoiser is exactly the one-step GET.
    return torch.where(t == 1, sigma_max, (hi + (1 - t) * (lo - hi)) ** rho)


def sampler_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
                   ) -> torch.Tensor:
    """sigma(t_i) for Algorithm 1's grid t = 1, (k-1)/k, ..., 1/k (k = num_steps): (k,) float64, descending."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1 (the paper uses 1, 2, 4, 8), got {num_steps!r}")
    t = torch.arange(num_steps, 0, -1, dtype=torch.float64) / num_steps  # (k,)
    return sigma_of_t(t, sigma_min, sigma_max, rho)


def _per_sample(sigma: torch.Tensor | float, like: torch.Tensor, name: str) -> torch.Tensor:
    """sigma as a tensor broadcastable against ``like`` (B, ...): a scalar stays 0-d, (B,) becomes (B, 1, ..., 1)."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.dim() == 0:
        return sigma
    if sigma.shape != (like.shape[0],):
        raise ValueError(f"{name} must be a scalar or have shape ({like.shape[0]},), got {tuple(sigma.shape)}")
    return sigma.view(-1, *([1] * (like.dim() - 1)))


def sample_posterior(z_t: torch.Tensor, x: torch.Tensor, sigma_t: torch.Tensor | float,
                     sigma_s: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
    """A draw z_s ~ q(z_s | z_t, x) of the forward process z = x + sigma eps (EDM units), for sigma_s <= sigma_t.

    Args:
        z_t: (B, ...) the noisier state, at sigma_t.
        x: (B, ...) the clean image conditioned on (pass sg(x_tilde) in training: no gradient through z_s).
        sigma_t, sigma_s: noise levels, scalars or (B,).
        noise: (B, ...) unit Gaussian.

    Returns:
        (B, ...) (sigma_s^2/sigma_t^2) z_t + (1 - sigma_s^2/sigma_t^2) x + sigma_s sqrt(1 - sigma_s^2/sigma_t^2) noise.
    """
    sigma_t, sigma_s = _per_sample(sigma_t, z_t, "sigma_t"), _per_sample(sigma_s, z_t, "sigma_s")
    if not bool(((sigma_s > 0) & (sigma_s <= sigma_t)).all()):
        raise ValueError("sample_posterior: need 0 < sigma_s <= sigma_t, got sigma_t="
                         f"{sigma_t.flatten().tolist()[:8]}, sigma_s={sigma_s.flatten().tolist()[:8]}")
    ratio = (sigma_s / sigma_t) ** 2  # sigma_s^2 / sigma_t^2
    return ratio * z_t + (1 - ratio) * x + sigma_s * (1 - ratio).sqrt() * noise


@torch.no_grad()
def mm_sampler(generator: Denoiser, latents: torch.Tensor, class_labels: torch.Tensor | None = None,
               num_steps: int = 1, randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
               sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """Algorithm 1: ancestral sampling with a noise-conditioned generator, float64 state.

    Args:
        generator: g(z_t, sigma_t, class_labels) -> x_tilde, e.g. a :class:`get.distill.get_denoiser.GETDenoiser`
            or any EDM denoiser; sigma_t is passed as a 0-d float64 tensor (EDM units).
        latents: (B, C, R, R) unit Gaussian; z_1 = sigma_max * latents.
        class_labels: passed to the generator unchanged (int64 (B,) or one-hot (B, label_dim); None).
        num_steps: k (the paper uses 1, 2, 4, 8); k = 1 is one-step generation.
        randn_like: noise for the k - 1 posterior draws; ``StackedRandomGenerator(device, seeds).randn_like`` makes
            each sample a function of its own seed (drawn in step order, after the seed's latent and label). A GET
            generator also draws its initial equilibrium state: fix it per seed too (e.g. ``lambda z, s, y:
            D(z, s, y, z0=z0)`` with a per-seed z0) when samples must depend on their seeds only.
        sigma_min, sigma_max, rho: the t -> sigma map (:func:`sigma_of_t`).

    Returns:
        (B, C, R, R) float64: the last x_tilde.
    """
    sigmas = sampler_sigmas(num_steps, sigma_min, sigma_max, rho).to(latents.device)  # (k,)
    z = latents.to(torch.float64) * sigmas[0]  # (B, C, R, R) pure noise at t = 1
    for i in range(num_steps - 1):
        x_tilde = generator(z, sigmas[i], class_labels).to(torch.float64)  # (B, C, R, R)
        z = sample_posterior(z, x_tilde, sigmas[i], sigmas[i + 1], randn_like(z))
    return generator(z, sigmas[-1], class_labels).to(torch.float64)  # (B, C, R, R) the last x_tilde


def sample_times(batch: int, num_steps: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 2's times: s ~ U[0, 1] and t = min(s + U[0, 1/k], 1), each (B,) float64 on ``device``."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    s = torch.rand(batch, generator=generator, dtype=torch.float64, device=device)  # (B,)
    t = (s + torch.rand(batch, generator=generator, dtype=torch.float64, device=device) / num_steps).clamp(max=1.0)
    return s, t


def mm_loss_weight(sigma_s: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """w(s) = EDM's lambda(sigma_s) = 1/sigma_s^2 + 1/sigma_data^2 (see the module docstring for the choice)."""
    return edm_loss_weight(sigma_s, sigma_data)


def auxiliary_loss(aux_denoised: torch.Tensor, x_tilde: torch.Tensor, teacher_denoised: torch.Tensor,
                   sigma_s: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """The auxiliary denoiser's loss mean[w(s) ((sg(x_tilde) - g_phi)^2 + (sg(x_hat) - g_phi)^2)].

    Args:
        aux_denoised: (B, C, H, W) g_phi(z_s), with gradient to phi.
        x_tilde: (B, C, H, W) the generator's output (detached here).
        teacher_denoised: (B, C, H, W) x_hat_theta(z_s) (detached here).
        sigma_s: (B,) noise levels of z_s (EDM units).
    """
    return (denoising_loss(aux_denoised, x_tilde.detach(), sigma_s, sigma_data)
            + denoising_loss(aux_denoised, teacher_denoised.detach(), sigma_s, sigma_data))


def generator_loss(x_tilde: torch.Tensor, aux_denoised: torch.Tensor, teacher_denoised: torch.Tensor,
                   sigma_s: torch.Tensor, sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The generator's surrogate loss, whose gradient in x_tilde is w(s) (g_phi(z_s) - x_hat(z_s)) / x_tilde.numel().

    Args:
        x_tilde: (B, C, H, W) g_eta(z_t, sigma_t), with gradient to eta.
        aux_denoised, teacher_denoised: (B, C, H, W) g_phi(z_s) and x_hat_theta(z_s) (no gradient taken).
        sigma_s: (B,) noise levels of z_s (EDM units).

    Returns:
        (scalar surrogate loss, the detached per-pixel gradient w(s) (g_phi - x_hat), (B, C, H, W)).
    """
    weight = mm_loss_weight(sigma_s.to(x_tilde.dtype), sigma_data).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    grad = (weight * (aux_denoised - teacher_denoised)).detach()  # (B, C, H, W)
    return surrogate_loss(x_tilde, grad), grad


def teacher_loss_directional_derivative(teacher: nn.Module, direction: Mapping[str, torch.Tensor],
                                        x_tilde: torch.Tensor, z_s: torch.Tensor, sigma_s: torch.Tensor,
                                        class_labels: torch.Tensor | None = None, sigma_data: float = 0.5
                                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Experimental (Algorithm 3): v^T grad_theta l(theta) for the teacher's denoising loss on student samples,
    l(theta) = mean[w(s) (x_tilde - x_hat_theta(z_s))^2], by forward-mode ``torch.func.jvp`` over the parameters.

    Algorithm 3 minimises v^T m_2(eta) with v = Lambda m_1 from an independent half batch; this returns the per-batch
    v^T grad_theta l, differentiable in x_tilde (and z_s), so backpropagating it reaches the generator. No parameter
    gradient of the teacher is formed, and the teacher's parameters are not changed.

    Args:
        teacher: the denoiser module x_hat_theta(z, sigma, class_labels).
        direction: v, a tangent for some of the teacher's parameters: {name: tensor of that parameter's shape and
            dtype}; parameters not named stay fixed (tangent 0).
        x_tilde: (B, C, H, W) student samples (the regression target).
        z_s: (B, C, H, W) their noisy versions at sigma_s.
        sigma_s: (B,) noise levels (EDM units).
        class_labels: passed to the teacher.

    Returns:
        (l(theta), v^T grad_theta l(theta)), two scalars.
    """
    params = dict(teacher.named_parameters())
    if not direction:
        raise ValueError("teacher_loss_directional_derivative: direction is empty")
    for name, v in direction.items():
        if name not in params:
            raise ValueError(f"teacher_loss_directional_derivative: direction[{name!r}] is not a parameter of the "
                             f"teacher (parameters: {list(params)[:8]}...)")
        if v.shape != params[name].shape or v.dtype != params[name].dtype:
            raise ValueError(f"teacher_loss_directional_derivative: direction[{name!r}] is {v.dtype} "
                             f"{tuple(v.shape)}, the parameter {params[name].dtype} {tuple(params[name].shape)}")
    names = list(direction)
    fixed = {name: p.detach() for name, p in params.items()}  # the parameters off the direction: constants

    def loss_of(*theta):
        denoised = functional_call(teacher, fixed | dict(zip(names, theta)), (z_s, sigma_s, class_labels))
        return denoising_loss(denoised, x_tilde, sigma_s, sigma_data)

    return jvp(loss_of, tuple(fixed[name] for name in names), tuple(direction[name] for name in names))
