"""EDM's Heun sampler (Karras et al. 2022, Algorithm 2) and its time steps; docs/EDM.md.

The sampler's inputs for a list of seeds (latents, labels, per-seed noise for the churn) come from ``get.seeds``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["check_sampler_settings", "sampler_sigma_range", "edm_time_steps", "edm_sampler"]


def check_sampler_settings(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                           S_churn: float = 0.0, S_min: float = 0.0, S_max: float = math.inf, S_noise: float = 1.0,
                           names: Mapping[str, str] | None = None) -> None:
    """Raises ValueError naming the first sampler setting outside its domain, with the value given.

    Each setting is named by ``names[keyword]`` when given (a script passes its command-line flags), else by its
    keyword. Bad values would otherwise divide by zero (``rho = 0``), take the square root of a negative number
    (``S_churn < 0``) or silently give another schedule (``rho < 0``, NaN).
    """
    name = lambda key: (names or {}).get(key, key)
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 2:
        raise ValueError(f"{name('num_steps')} must be an integer >= 2, got {num_steps!r}")
    values = dict(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, S_churn=S_churn, S_min=S_min, S_max=S_max,
                  S_noise=S_noise)
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            raise ValueError(f"{name(key)} must be a number, got {value!r}")
        if math.isinf(value) and not (key == "S_max" and value > 0):  # S_max = inf: churn at every level
            raise ValueError(f"{name(key)} must be finite, got {value!r}")
    if not sigma_min > 0:
        raise ValueError(f"{name('sigma_min')} must be > 0, got {sigma_min!r}")
    if not sigma_max > sigma_min:
        raise ValueError(f"{name('sigma_max')} must be > {name('sigma_min')}, got {sigma_max!r} <= {sigma_min!r}")
    if not rho > 0:
        raise ValueError(f"{name('rho')} must be > 0, got {rho!r}")
    for key in ("S_churn", "S_min", "S_noise"):
        if values[key] < 0:
            raise ValueError(f"{name(key)} must be >= 0, got {values[key]!r}")
    if S_min > S_max:
        raise ValueError(f"{name('S_min')} must be <= {name('S_max')}, got {S_min!r} > {S_max!r}")


def sampler_sigma_range(net, sigma_min: float, sigma_max: float,
                        names: Mapping[str, str] | None = None) -> tuple[float, float]:
    """(sigma_min, sigma_max) clipped to the teacher's noise range; ValueError, naming the values given and the
    teacher's range, when nothing of the interval is left."""
    lo, hi = max(sigma_min, float(net.sigma_min)), min(sigma_max, float(net.sigma_max))
    if not lo < hi:
        name = lambda key: (names or {}).get(key, key)
        raise ValueError(f"{name('sigma_min')} {sigma_min!r} and {name('sigma_max')} {sigma_max!r} leave no interval "
                         f"inside the teacher's noise range [{float(net.sigma_min)!r}, {float(net.sigma_max)!r}]")
    return lo, hi


def edm_time_steps(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                   round_sigma: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Karras et al. time steps t_0 = sigma_max > ... > t_{N-1} = sigma_min, then t_N = 0 (float64, shape (N+1,))."""
    check_sampler_settings(num_steps, sigma_min, sigma_max, rho)
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=device)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1)
               * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    if round_sigma is not None:
        t_steps = torch.as_tensor(round_sigma(t_steps), dtype=torch.float64, device=device)
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])


def _as_one_hot(class_labels: torch.Tensor | None, label_dim: int) -> torch.Tensor | None:
    """Integer labels (B,) become one-hot rows (B, label_dim); float rows pass through."""
    if class_labels is None or label_dim == 0:
        return None
    if class_labels.dtype in (torch.int32, torch.int64) and class_labels.ndim == 1:
        if class_labels.numel() and (int(class_labels.min()) < 0 or int(class_labels.max()) >= label_dim):
            raise ValueError(f"class_labels must lie in [0, {label_dim}), got min {int(class_labels.min())} "
                             f"max {int(class_labels.max())}")
        return F.one_hot(class_labels, label_dim).to(torch.float32)
    return class_labels


@torch.no_grad()
def edm_sampler(net, latents: torch.Tensor, class_labels: torch.Tensor | None = None,
                randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like, num_steps: int = 18,
                sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, S_churn: float = 0.0,
                S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0) -> torch.Tensor:
    """EDM's Heun sampler (deterministic for ``S_churn = 0``), float64 state, 2N-1 denoiser evaluations.

    Args:
        net: a teacher: ``net(x, sigma, class_labels) -> D(x; sigma)``, with ``sigma_min``, ``sigma_max``,
            ``round_sigma`` and ``label_dim``.
        latents: (B, C, R, R) unit Gaussian; the start is ``latents * t_0`` with t_0 = sigma_max.
        class_labels: one-hot (B, label_dim) as EDM passes them, or int64 class indices (B,); None if unconditional.
        randn_like: noise source for the churn; pass ``get.seeds.SeedInputs.noise.randn_like`` for per-seed noise.
            It is called at every step even when the churn is zero (as in EDM), so per-seed streams stay aligned.
        num_steps: N; sigma_min, sigma_max, rho: the Karras schedule (sigma_min/max clipped to the net's range).
        S_churn, S_min, S_max, S_noise: stochasticity (EDM Algorithm 2).
        All settings are checked first (:func:`check_sampler_settings`, :func:`sampler_sigma_range`).

    Returns:
        (B, C, R, R) float64 images, unclipped.
    """
    check_sampler_settings(num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise)
    sigma_min, sigma_max = sampler_sigma_range(net, sigma_min, sigma_max)
    class_labels = _as_one_hot(class_labels, int(getattr(net, "label_dim", 0)))
    t_steps = edm_time_steps(num_steps, sigma_min, sigma_max, rho, net.round_sigma, latents.device)  # (N+1,)

    x_next = latents.to(torch.float64) * t_steps[0]  # (B, C, R, R)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # Increase the noise temporarily.
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = torch.as_tensor(net.round_sigma(t_cur + gamma * t_cur), dtype=torch.float64, device=latents.device)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)

        # Euler step.
        denoised = net(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Apply 2nd order correction.
        if i < num_steps - 1:
            denoised = net(x_next, t_next, class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next
