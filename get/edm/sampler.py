"""EDM's Heun sampler (Karras et al. 2022, Algorithm 2) and its time steps; docs/EDM.md.

The sampler's inputs for a list of seeds (latents, labels, per-seed noise for the churn) come from ``get.seeds``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["edm_time_steps", "edm_sampler"]


def edm_time_steps(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                   round_sigma: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Karras et al. time steps t_0 = sigma_max > ... > t_{N-1} = sigma_min, then t_N = 0 (float64, shape (N+1,))."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
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

    Returns:
        (B, C, R, R) float64 images, unclipped.
    """
    sigma_min = max(sigma_min, float(net.sigma_min))
    sigma_max = min(sigma_max, float(net.sigma_max))
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
