"""A noise-conditioned GET as an EDM denoiser D(x; sigma, labels), exactly the one-step GET at sigma = sigma_max.

Multi-step distillation (Moment Matching, DMD2's multi-step generator) needs a generator g(z_t; sigma_t) that denoises
at any noise level; the natural starting point is an offline-distilled one-step GET, which maps the unit latent
z = x_T / sigma_max to an image. :class:`GETDenoiser` wraps a ``GET(noise_cond=True)`` in EDM's preconditioning

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma), labels)

with EDM's c_skip = sigma_d^2 / (sigma^2 + sigma_d^2), c_out = sigma sigma_d / sqrt(sigma^2 + sigma_d^2) and
c_noise = ln(sigma) / 4 (Karras et al. 2022, Table 1; sigma_d = ``sigma_data``, sigma_M = ``sigma_max``), and maps
F onto the GET as follows.

* Input. u = c_in(sigma) x with c_in(sigma) = r(sigma) / sigma_M, r(sigma) = sqrt(sigma_M^2 + sigma_d^2) /
  sqrt(sigma^2 + sigma_d^2): EDM's c_in = 1/sqrt(sigma^2 + sigma_d^2) times the constant sqrt(sigma_M^2 + sigma_d^2) /
  sigma_M (1 + 2e-5 for 80 and 0.5), chosen so that r(sigma_M) = 1: at sigma_max the GET reads x / sigma_M, which for
  pure noise x_T = sigma_M z is the unit latent z of one-step generation (for x_T = x_0 + sigma_M z it is
  z + x_0 / sigma_M). Elsewhere u has about unit variance, as EDM intends.
* Output. The GET's output y = GET(u; sigma, labels) is an image, not EDM's unit-variance F. F is y read in EDM's
  F-units at sigma_M, F = (y - c_skip(sigma_M) sigma_M u) / c_out(sigma_M): a fixed affine read-out (no parameters)
  that makes c_skip(sigma_M) x_T + c_out(sigma_M) F = y, i.e. D(sigma_M z; sigma_M) = GET(z). Below sigma_max EDM's
  skip takes over as usual: for small sigma, D ~ x + (sigma / sigma_d) (y - ...), so the GET's target is about
  -sigma_d times the noise (unit scale), and an untrained noise input (which leaves y independent of sigma) already
  gives a near-identity denoiser at low noise and the one-step GET at high noise.

Expanded, D = (c_out(sigma) / c_out(sigma_M)) y + (c_skip(sigma) - (c_out(sigma) / c_out(sigma_M)) c_skip(sigma_M)
r(sigma)) x; at sigma = sigma_M the first coefficient is exactly 1 and the second exactly 0, so D(x_T; sigma_M) is
bit-identical to GET(z) whenever x_T / sigma_M reproduces z exactly: x_T = sigma_M z formed in float64, as
:func:`get.distill.moment_matching.mm_sampler` does (``edm_sampler`` too when its first step rounds to sigma_max
exactly, as 80 does); otherwise equal to rounding.

Which GET iterate D returns: ``forward`` (the evaluation solve, lowest-residual iterate, no gradient through the
solve) by default, for sampling; ``differentiable=True`` returns the last state of ``trajectory`` (the gradient-tracked
training path), which a distillation loss backpropagates through.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from get.models import GET
from get.noise_cond import as_sigma
from get.teachers import tensors_sha256

__all__ = ["GETDenoiser"]


class GETDenoiser(nn.Module):
    """EDM denoiser D(x; sigma, class_labels) around a noise-conditioned GET (see the module docstring for the map).

    It has the :class:`get.teachers.Teacher` attributes samplers use (``name``, ``resolution``, ``channels``,
    ``label_dim``, ``sigma_min``, ``sigma_max``, ``round_sigma``, ``identity``) and the calling convention
    ``net(x, sigma, class_labels)``, so ``get.edm.sampler.edm_sampler`` runs with it. It has no ``bottleneck``.

    Args:
        get_model: a :class:`get.models.GET` built or loaded with ``noise_cond=True``
            (``GET.from_pretrained(path, noise_cond=True)`` turns a one-step GET into one with identical outputs).
        sigma_data: EDM's sigma_d, the data standard deviation (image units; 0.5 for images in [-1, 1]).
        sigma_max: the noise level (EDM units) at which D is the one-step GET on the unit latent.
        sigma_min: the smallest noise level a sampler should use (EDM units).
    """

    def __init__(self, get_model: GET, sigma_data: float = 0.5, sigma_max: float = 80.0, sigma_min: float = 0.002):
        super().__init__()
        if not isinstance(get_model, GET) or not get_model.noise_cond:
            got = f"GET(noise_cond={get_model.noise_cond})" if isinstance(get_model, GET) else type(get_model).__name__
            raise ValueError(f"GETDenoiser: get_model must be a GET with noise_cond=True, got {got}; load one with "
                             f"GET.from_pretrained(path, noise_cond=True)")
        for key, value in (("sigma_data", sigma_data), ("sigma_max", sigma_max), ("sigma_min", sigma_min)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"GETDenoiser: {key} must be a finite number > 0, got {value!r}")
        if sigma_min >= sigma_max:
            raise ValueError(f"GETDenoiser: sigma_min must be < sigma_max, got sigma_min={sigma_min}, "
                             f"sigma_max={sigma_max}")
        self.model = get_model
        self.sigma_data, self.sigma_max, self.sigma_min = float(sigma_data), float(sigma_max), float(sigma_min)
        self.name = "get-denoiser"

    # -- Teacher protocol attributes ----------------------------------------------------------------------------

    @property
    def resolution(self) -> int:
        return self.model.input_size

    @property
    def channels(self) -> int:
        return self.model.in_channels

    @property
    def label_dim(self) -> int:
        return self.model.num_classes

    def round_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(sigma)

    def identity(self) -> dict[str, Any]:
        config = {"class_name": "GETDenoiser", "get": self.model.config, "sigma_data": self.sigma_data,
                  "sigma_max": self.sigma_max, "sigma_min": self.sigma_min}
        return {"name": self.name, "sha256": tensors_sha256(self.model.state_dict()), "config": config}

    # -- preconditioning ---------------------------------------------------------------------------------------

    def c_skip(self, sigma: torch.Tensor) -> torch.Tensor:
        """EDM's skip weight sigma_d^2 / (sigma^2 + sigma_d^2), same shape as sigma."""
        return self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)

    def c_out(self, sigma: torch.Tensor) -> torch.Tensor:
        """EDM's output scale sigma sigma_d / sqrt(sigma^2 + sigma_d^2), same shape as sigma."""
        return sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        """r(sigma) / sigma_max: EDM's c_in rescaled so that c_in(sigma_max) = 1 / sigma_max exactly."""
        return self._input_ratio(sigma) / self.sigma_max

    def _input_ratio(self, sigma: torch.Tensor) -> torch.Tensor:
        """r(sigma) = sqrt(sigma_M^2 + sigma_d^2) / sqrt(sigma^2 + sigma_d^2); r(sigma_M) == 1 exactly."""
        sd2 = self.sigma_data ** 2
        return torch.as_tensor(self.sigma_max ** 2 + sd2, dtype=sigma.dtype).sqrt() / (sigma ** 2 + sd2).sqrt()

    def _labels(self, class_labels: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """One-hot rows (B, label_dim), as EDM's samplers pass labels, become the int64 indices GET takes."""
        if class_labels is None or not class_labels.is_floating_point():
            return class_labels  # indices or None: GET checks them
        L = self.label_dim
        if L == 0:
            raise ValueError(f"GETDenoiser: class_labels given ({tuple(class_labels.shape)}) but the GET is "
                             f"unconditional")
        one_hot = (class_labels.shape == (batch, L) and bool(((class_labels == 0) | (class_labels == 1)).all())
                   and bool((class_labels.sum(1) == 1).all()))
        if not one_hot:
            raise ValueError(f"GETDenoiser: class_labels must be int64 indices ({batch},) or one-hot rows "
                             f"({batch}, {L}) (GET's class embedding takes one class per sample), got "
                             f"{class_labels.dtype} {tuple(class_labels.shape)}")
        return class_labels.argmax(1)  # (B,)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None, *,
                differentiable: bool = False, z0: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """D(x; sigma, class_labels), returned in x's dtype.

        Args:
            x: (B, C, R, R) noisy images x_0 + sigma n (image units).
            sigma: noise level(s) in EDM units, a scalar or (B,), > 0.
            class_labels: int64 indices (B,), one-hot rows (B, label_dim), or None for an unconditional GET.
            differentiable: use the GET's gradient-tracked ``trajectory(...)[-1]`` (training) instead of its
                evaluation solve ``forward`` (sampling).
            z0, generator: the GET's initial equilibrium state (B, N, D), or the generator that draws it.
        """
        if not torch.is_tensor(x) or x.dim() != 4:
            raise ValueError(f"GETDenoiser: x must be a (B, C, R, R) tensor, got "
                             f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        labels = self._labels(class_labels, x.shape[0])
        sigma = as_sigma(sigma, x.shape[0], x.device, torch.float64, "GETDenoiser", self.model.check_finite)  # (B,)
        s = sigma.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        x64 = x.to(torch.float64)
        r = self._input_ratio(s)  # (B, 1, 1, 1)
        u = (x64 / self.sigma_max * r).to(self.model.x_embedder.proj.weight.dtype)  # (B, C, R, R) = c_in x
        if differentiable:
            y = self.model.trajectory(u, labels, z0=z0, generator=generator, sigma=sigma)[-1]  # (B, C, R, R)
        else:
            y = self.model(u, labels, z0=z0, generator=generator, sigma=sigma)  # (B, C, R, R)
        sigma_max = torch.tensor(self.sigma_max, dtype=torch.float64, device=x.device)
        # c_out F = out_scale (y - c_skip(sigma_M) sigma_M u) and sigma_M u = r x; grouped so that at sigma_M the
        # coefficient of y is exactly 1 and that of x exactly 0.
        out_scale = self.c_out(s) / self.c_out(sigma_max)  # (B, 1, 1, 1)
        skip = self.c_skip(s) - out_scale * self.c_skip(sigma_max) * r  # (B, 1, 1, 1)
        return (out_scale * y.to(torch.float64) + skip * x64).to(x.dtype)
