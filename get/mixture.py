"""The analytic teacher: a Gaussian mixture in image space whose EDM denoiser, samples, moments and log-density are
exact in closed form (float64), so the whole pipeline runs and is tested without downloads. docs/EDM.md describes
where it stands beside the EDM networks; get.metrics.exact computes exact sample-quality metrics against it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from get.io import tensors_sha256

__all__ = ["MixtureTeacher", "MIXTURE_SPECS"]


def _smooth_fields(n: int, channels: int, resolution: int, max_frequency: int,
                   generator: torch.Generator) -> torch.Tensor:
    """Random smooth images (n, C, R, R), float64, unit RMS each: low-frequency plane waves, 1/(1+f^2) amplitudes."""
    f = torch.arange(-max_frequency, max_frequency + 1, dtype=torch.float64)
    fx, fy = torch.meshgrid(f[max_frequency:], f, indexing="ij")  # half-plane (fx >= 0) covers every orientation
    fx, fy = fx.reshape(-1), fy.reshape(-1)  # (P,)
    amplitude = 1.0 / (1.0 + fx ** 2 + fy ** 2)  # (P,) 1/f^2 decay: smooth fields
    coords = (torch.arange(resolution, dtype=torch.float64) + 0.5) / resolution  # pixel centres in [0, 1)
    u, v = torch.meshgrid(coords, coords, indexing="ij")  # (R, R)
    phase_grid = 2 * math.pi * (fx[:, None, None] * u + fy[:, None, None] * v)  # (P, R, R)
    coeff = torch.randn(n, channels, fx.numel(), generator=generator, dtype=torch.float64) * amplitude  # (n, C, P)
    phase = torch.rand(n, channels, fx.numel(), generator=generator, dtype=torch.float64) * 2 * math.pi  # (n, C, P)
    fields = torch.einsum("ncp,ncpij->ncij", coeff, torch.cos(phase_grid + phase[..., None, None]))  # (n, C, R, R)
    return fields / fields.square().mean(dim=(1, 2, 3), keepdim=True).sqrt()


def _soft_shapes(n: int, channels: int, resolution: int, generator: torch.Generator) -> torch.Tensor:
    """One coloured soft-edged disc (even index) or square (odd index) per image, (n, C, R, R) float64."""
    coords = (torch.arange(resolution, dtype=torch.float64) + 0.5) / resolution
    u, v = torch.meshgrid(coords, coords, indexing="ij")  # (R, R)
    centre = 0.25 + 0.5 * torch.rand(n, 2, generator=generator, dtype=torch.float64)  # (n, 2)
    radius = 0.15 + 0.2 * torch.rand(n, generator=generator, dtype=torch.float64)  # (n,)
    colour = torch.randn(n, channels, generator=generator, dtype=torch.float64)  # (n, C)
    du, dv = u - centre[:, 0, None, None], v - centre[:, 1, None, None]  # (n, R, R)
    disc = (du ** 2 + dv ** 2).sqrt()
    square = torch.maximum(du.abs(), dv.abs())
    dist = torch.where((torch.arange(n) % 2 == 0)[:, None, None], disc, square)  # (n, R, R)
    mask = torch.sigmoid((radius[:, None, None] - dist) * resolution / 1.5)  # edge about 1.5 pixels wide
    return colour[:, :, None, None] * mask[:, None]  # (n, C, R, R)


class MixtureTeacher(nn.Module):
    """Gaussian mixture in image space with an exact EDM denoiser.

    The data distribution is p(y) = sum_k pi_k N(y; mu_k, Sigma_k) over y in R^D, D = C*R*R, with uniform weights
    pi_k = 1/K and covariances Sigma_k = U_k U_k^T + diag(d_k) (low rank r plus a positive diagonal). Everything is
    fixed by ``seed`` (CPU float64 generator):

    * mean mu_k: a smooth random field (plane waves up to ``max_frequency`` cycles per image, 1/f^2 amplitudes)
      plus one coloured soft disc or square, scaled to RMS ``mean_scale`` per pixel;
    * factors U_k: ``rank`` smooth random fields, eigen-weights ~ 1/(j+1), total RMS ``factor_scale`` per pixel;
      with ``factor_sharing`` = s each field is sqrt(s) * (a field common to all components) + sqrt(1 - s) * (its own),
      so s = 1 gives every component the same modes of variation (a smoother noise -> image map);
    * diagonal d_k: (``diag_scale`` * a smooth positive field)^2.

    Noisy data x = y + sigma n has p(x | k) = N(mu_k, Sigma_k + sigma^2 I) and the exact posterior mean (EDM's ideal
    denoiser) is D(x; sigma) = sum_k r_k(x) (x - sigma^2 (Sigma_k + sigma^2 I)^{-1} (x - mu_k)) with responsibilities
    r_k(x) proportional to pi_k N(x; mu_k, Sigma_k + sigma^2 I). The inverse and the log-determinant use the Woodbury
    identity and the matrix determinant lemma with the r x r capacitance I + U_k^T diag(1/a) U_k, a = d_k + sigma^2,
    in float64, as matrix products: O(B K D r) per noise level in the batch plus O(K D r^2) per distinct sigma.

    Classes. With ``conditional=True`` the teacher has ``label_dim = num_classes`` (default: K, i.e. a class is a
    component) and component k belongs to class ``k mod num_classes``. A label row w (B, label_dim), one-hot as EDM
    passes it, reweights the prior over components to pi_k * w[class(k)]: one-hot gives the exact class-conditional
    denoiser, ``class_labels=None`` the exact unconditional one (the marginal), rows must be non-negative and not all
    zero.

    Args:
        resolution: image side R (pixels).
        channels: image channels C.
        num_components: K.
        rank: r, rank of each U_k (0 = purely diagonal covariances).
        mean_scale: RMS pixel value of each component mean.
        factor_scale: RMS per-pixel standard deviation of the low-rank part.
        diag_scale: RMS per-pixel standard deviation of the diagonal part (> 0: keeps log-densities finite).
        max_frequency: highest spatial frequency (cycles per image) of the random fields; lower = smoother.
        factor_sharing: in [0, 1], how much the components share their low-rank factors (see above).
        seed: fixes every parameter.
        conditional: whether the teacher takes class labels.
        num_classes: number of classes when conditional (default K); each class gets the components k with
            k mod num_classes equal to it.
        name: teacher name (default 'mixture-<R>x<R>x<C>-k<K>[-cond]').
    """

    PRESETS: dict[str, dict[str, Any]] = {
        "default": dict(resolution=32, channels=3, num_components=10, rank=8, mean_scale=0.4, factor_scale=0.3,
                        diag_scale=0.05, max_frequency=3),
        "demo": dict(resolution=16, channels=3, num_components=4, rank=4, mean_scale=0.3, factor_scale=0.35,
                     diag_scale=0.05, max_frequency=2, factor_sharing=1.0),
    }

    def __init__(self, resolution: int = 32, channels: int = 3, num_components: int = 10, rank: int = 8,
                 mean_scale: float = 0.4, factor_scale: float = 0.3, diag_scale: float = 0.05,
                 max_frequency: int = 3, factor_sharing: float = 0.0, seed: int = 0, conditional: bool = False,
                 num_classes: int | None = None, name: str | None = None):
        super().__init__()
        for key, value, low in (("resolution", resolution, 1), ("channels", channels, 1),
                                ("num_components", num_components, 1), ("rank", rank, 0),
                                ("max_frequency", max_frequency, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"MixtureTeacher: {key} must be an integer >= {low}, got {value!r}")
        for key, value in (("mean_scale", mean_scale), ("factor_scale", factor_scale), ("diag_scale", diag_scale)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"MixtureTeacher: {key} must be a finite number >= 0, got {value!r}")
        if not isinstance(factor_sharing, (int, float)) or not 0 <= factor_sharing <= 1:
            raise ValueError(f"MixtureTeacher: factor_sharing must be in [0, 1], got {factor_sharing!r}")
        if diag_scale <= 0:
            raise ValueError("MixtureTeacher: diag_scale must be > 0 (the covariances must be positive definite)")
        if num_classes is not None and not conditional:
            raise ValueError("MixtureTeacher: num_classes is only meaningful with conditional=True")
        num_classes = (num_components if num_classes is None else num_classes) if conditional else 0
        if conditional and not 1 <= num_classes <= num_components:
            raise ValueError(f"MixtureTeacher: num_classes must be in [1, num_components={num_components}], "
                             f"got {num_classes}")
        self.config = dict(resolution=resolution, channels=channels, num_components=num_components, rank=rank,
                           mean_scale=float(mean_scale), factor_scale=float(factor_scale),
                           diag_scale=float(diag_scale), max_frequency=max_frequency,
                           factor_sharing=float(factor_sharing), seed=int(seed),
                           conditional=bool(conditional), num_classes=num_classes if conditional else None)
        self.name = name or f"mixture-{resolution}x{resolution}x{channels}-k{num_components}" + (
            "-cond" if conditional else "")
        self.config["name"] = self.name
        self.resolution, self.channels, self.num_components, self.rank = resolution, channels, num_components, rank
        self.label_dim = num_classes
        self.sigma_min, self.sigma_max = 0.0, float("inf")
        self.dim = channels * resolution * resolution

        g = torch.Generator().manual_seed(int(seed))
        K, C, R, D = num_components, channels, resolution, self.dim
        mean_img = 0.5 * _smooth_fields(K, C, R, max_frequency, g) + _soft_shapes(K, C, R, g)  # (K, C, R, R)
        mean_img = mean_img / mean_img.square().mean(dim=(1, 2, 3), keepdim=True).sqrt()
        eig_weight = 1.0 / torch.arange(1, rank + 1, dtype=torch.float64)
        eig_weight = (eig_weight / eig_weight.sum()).sqrt()  # (r,) sum of squares 1
        factor_img = _smooth_fields(K * rank, C, R, max_frequency, g).reshape(K, rank, D)  # (K, r, D) unit RMS
        shared_img = _smooth_fields(rank, C, R, max_frequency, g).reshape(1, rank, D)  # (1, r, D) common to all k
        factor_img = math.sqrt(factor_sharing) * shared_img + math.sqrt(1 - factor_sharing) * factor_img
        diag_img = torch.exp(0.5 * _smooth_fields(K, C, R, max_frequency, g)).reshape(K, D)  # (K, D) positive
        diag_img = diag_img / diag_img.square().mean(dim=1, keepdim=True).sqrt()
        self.register_buffer("means", mean_scale * mean_img.reshape(K, D))  # (K, D)
        self.register_buffer("factors", factor_scale * (factor_img * eig_weight[:, None]).transpose(1, 2))  # (K, D, r)
        self.register_buffer("diag", (diag_scale * diag_img) ** 2)  # (K, D)
        self.register_buffer("log_weights", torch.full((K,), -math.log(K), dtype=torch.float64))  # (K,)
        class_of = torch.arange(K) % num_classes if conditional else torch.zeros(K, dtype=torch.int64)
        self.register_buffer("class_of", class_of)  # (K,) int64

    @classmethod
    def preset(cls, name: str, **overrides) -> MixtureTeacher:
        """A named configuration: 'default' (32x32x3, 10 components) or 'demo' (16x16x3, 4 components).

        The demo preset was chosen by measuring how learnable its noise -> image map (the 18-step Heun ODE map) is,
        with ``bench/mixture_learnability.py``: held-out R^2 (fraction of variance explained) of a ridge regression
        and of a small MLP (768-512-512-768, 1000 Adam steps) fitted on 2000 pairs, 500 held out. In 768 dimensions
        the components never overlap (every output image has a posterior > 0.999 on one component), so the map
        partitions noise space into K basins; what makes it learnable is that inside each basin it is nearly the
        same affine map. With component-specific factors (factor_sharing=0) the linear fit explains 0.22 of the
        variance (MLP 0.41; 10 components: 0.12 / 0.27); with shared factors (factor_sharing=1, this preset) 0.79
        (MLP 0.81), 2 components 0.88, 1 component 1.00 (exactly affine). The remaining ~20 % is the choice of basin
        (the component mean), which is what a one-step generator must learn beyond a linear map.
        """
        if name not in cls.PRESETS:
            raise ValueError(f"MixtureTeacher.preset: unknown preset {name!r}; choose from {sorted(cls.PRESETS)}")
        kwargs = dict(cls.PRESETS[name])
        kwargs.setdefault("name", "mixture" if name == "default" else f"mixture-{name}")
        kwargs.update(overrides)
        if kwargs.get("conditional") and "name" not in overrides:
            kwargs["name"] += "-cond"
        return cls(**kwargs)

    # -- the Teacher protocol ---------------------------------------------------------------------------------

    def round_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(sigma)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Exact posterior mean E[y | y + sigma n = x] (EDM's ideal denoiser), returned in x's dtype."""
        return self._denoise(x, sigma, class_labels)[0].reshape(x.shape).to(x.dtype)

    def bottleneck(self, x: torch.Tensor, sigma: torch.Tensor | float,
                   class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Features (B, C + K, R/4, R/4) (R/1 if R is not a multiple of 4), float32: the denoised image average-pooled
        4x4, and the posterior over components r_k(x) broadcast over space. Differentiable in x."""
        denoised, resp = self._denoise(x, sigma, class_labels)
        pool = 4 if self.resolution % 4 == 0 else 1
        image = F.avg_pool2d(denoised.reshape(x.shape), pool)  # (B, C, R', R')
        resp_map = resp[:, :, None, None].expand(-1, -1, image.shape[2], image.shape[3])  # (B, K, R', R')
        return torch.cat([image, resp_map], dim=1).to(torch.float32)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": tensors_sha256(self.state_dict()),
                "config": {"class_name": "MixtureTeacher", "kwargs": dict(self.config)}}

    # -- exact quantities (float64) ---------------------------------------------------------------------------

    def component_means(self) -> torch.Tensor:
        """(K, C, R, R) float64."""
        return self.means.reshape(self.num_components, self.channels, self.resolution, self.resolution).clone()

    def component_covariance(self, k: int) -> torch.Tensor:
        """Dense Sigma_k = U_k U_k^T + diag(d_k), (D, D) float64."""
        U = self.factors[k].double()
        return U @ U.T + torch.diag(self.diag[k].double())

    def _class_weights(self, class_label: int | None) -> torch.Tensor:
        w = self.log_weights.double().exp()  # (K,)
        if class_label is not None:
            if self.label_dim == 0 or not 0 <= int(class_label) < self.label_dim:
                raise ValueError(f"class_label {class_label!r} out of range for label_dim={self.label_dim}")
            w = w * (self.class_of == int(class_label))
        return w / w.sum()

    def mean(self, class_label: int | None = None) -> torch.Tensor:
        """Exact mean image (C, R, R), float64, of the data (or of one class)."""
        w = self._class_weights(class_label)
        return (w @ self.means.double()).reshape(self.channels, self.resolution, self.resolution)

    def covariance(self, class_label: int | None = None) -> torch.Tensor:
        """Exact covariance (D, D), float64, D = C*R*R in (C, R, R) row-major order (dense: D^2 doubles)."""
        w = self._class_weights(class_label)
        mu = self.means.double()  # (K, D)
        m = w @ mu  # (D,)
        U = self.factors.double() * w.sqrt()[:, None, None]  # (K, D, r)
        cov = torch.einsum("kdr,ker->de", U, U) + torch.diag(w @ self.diag.double())
        cov += torch.einsum("k,kd,ke->de", w, mu, mu) - torch.outer(m, m)
        return cov

    def log_prob(self, x: torch.Tensor, sigma: float | torch.Tensor = 0.0,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Exact log-density (n,) float64 of x (n, C, R, R) under the data (sigma = 0) or noisy data (sigma > 0),
        in nats, w.r.t. Lebesgue measure on R^D; class_labels as in ``forward`` (None = unconditional)."""
        x64, sigma64 = self._check_x(x), self._check_sigma(sigma, x.shape[0], x.device)
        log_joint, _, _ = self._posterior(x64, sigma64, self._log_prior(class_labels, x.shape[0], x.device))
        return torch.logsumexp(log_joint, dim=1)

    def responsibilities(self, x: torch.Tensor, sigma: float | torch.Tensor = 0.0,
                         class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Posterior over components p(k | x) (n, K), float64."""
        x64, sigma64 = self._check_x(x), self._check_sigma(sigma, x.shape[0], x.device)
        return self._posterior(x64, sigma64, self._log_prior(class_labels, x.shape[0], x.device))[1]

    def sample(self, n: int, generator: torch.Generator | None = None,
               class_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact samples from the data distribution.

        Args:
            n: number of samples.
            generator: torch generator on the teacher's device (None: the global RNG).
            class_labels: int64 (n,) classes to sample from (conditional teachers only); None draws from the marginal.

        Returns:
            ``x`` (n, C, R, R) float64 and ``labels`` (n,) int64: class indices for a conditional teacher, component
            indices otherwise.
        """
        device = self.means.device
        probs = self.log_weights.double().exp().expand(n, -1)  # (n, K)
        if class_labels is not None:
            if self.label_dim == 0:
                raise ValueError("sample: class_labels given but the teacher is unconditional")
            class_labels = torch.as_tensor(class_labels, device=device)
            if class_labels.shape != (n,) or class_labels.dtype != torch.int64:
                raise ValueError(f"sample: class_labels must be int64 of shape ({n},), got {class_labels.dtype} "
                                 f"{tuple(class_labels.shape)}")
            if int(class_labels.min()) < 0 or int(class_labels.max()) >= self.label_dim:
                raise ValueError(f"sample: class_labels must lie in [0, {self.label_dim})")
            probs = probs * (self.class_of[None] == class_labels[:, None])
        comp = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (n,)
        eps_r = torch.randn(n, self.rank, 1, generator=generator, dtype=torch.float64, device=device)  # (n, r, 1)
        eps_d = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=device)  # (n, D)
        x = self.means.double()[comp] + (self.factors.double()[comp] @ eps_r).squeeze(2)
        x = x + self.diag.double()[comp].sqrt() * eps_d  # (n, D)
        labels = self.class_of[comp] if self.label_dim else comp
        return x.reshape(n, self.channels, self.resolution, self.resolution), labels

    # -- internals --------------------------------------------------------------------------------------------

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor | float,
                 class_labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """D(x; sigma) (B, D) float64 and the responsibilities (B, K)."""
        x64, sigma64 = self._check_x(x), self._check_sigma(sigma, x.shape[0], x.device)
        _, resp, ainv_v = self._posterior(x64, sigma64, self._log_prior(class_labels, x.shape[0], x.device))
        return x64 - sigma64[:, None] ** 2 * ainv_v, resp  # (B, D), (B, K)

    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.channels, self.resolution, self.resolution):
            raise ValueError(f"{self.name}: x must be (B, {self.channels}, {self.resolution}, {self.resolution}), "
                             f"got {tuple(x.shape)}")
        return x.to(torch.float64).reshape(x.shape[0], self.dim)

    @staticmethod
    def _check_sigma(sigma: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
        """sigma as (1,) (a scalar) or (B,) float64."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=device).reshape(-1)
        if sigma.numel() not in (1, batch):
            raise ValueError(f"sigma must be a scalar or have shape ({batch},), got {sigma.numel()} values")
        if bool((sigma < 0).any()) or not bool(torch.isfinite(sigma).all()):
            raise ValueError("sigma must be finite and >= 0")
        return sigma

    def _log_prior(self, class_labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """log pi_k reweighted by the label rows: (1, K) or (B, K)."""
        log_pi = self.log_weights.double()[None]  # (1, K)
        if class_labels is None or self.label_dim == 0:
            return log_pi
        w = torch.as_tensor(class_labels, device=device)
        if w.dtype in (torch.int32, torch.int64) and w.ndim == 1:
            w = F.one_hot(w, self.label_dim)
        w = w.to(torch.float64).reshape(-1, self.label_dim)
        if w.shape[0] not in (1, batch) or bool((w < 0).any()) or not bool((w.sum(1) > 0).all()):
            raise ValueError(f"{self.name}: class_labels must be (B, {self.label_dim}) non-negative rows, "
                             f"not all zero (one-hot), or int64 indices (B,)")
        return log_pi + torch.log(w[:, self.class_of])  # (B, K), -inf outside the class

    def _posterior(self, x: torch.Tensor, sigma: torch.Tensor,
                   log_prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For x (B, D) and sigma (S,), S in {1, B}: log pi_k N(x; mu_k, Sigma_k + sigma^2 I) (B, K), the
        responsibilities r_k (B, K) and sum_k r_k (Sigma_k + sigma^2 I)^{-1} (x - mu_k) (B, D), all float64.
        Samples are grouped by noise level (the sampler shares one sigma per call; DMD draws one per sample)."""
        if sigma.numel() == 1:
            return self._posterior_shared(x, sigma[0], log_prior)
        levels, group = torch.unique(sigma, return_inverse=True)
        parts, order = [], []
        for j, level in enumerate(levels):
            idx = (group == j).nonzero().squeeze(1)
            parts.append(self._posterior_shared(x[idx], level, log_prior[idx] if log_prior.shape[0] > 1 else log_prior))
            order.append(idx)
        back = torch.argsort(torch.cat(order))
        return tuple(torch.cat(p)[back] for p in zip(*parts))

    def _posterior_shared(self, x: torch.Tensor, sigma: torch.Tensor, log_prior: torch.Tensor):
        """``_posterior`` for one noise level; every O(B K D r) product is a matrix multiplication (no (B, K, D)
        intermediates): the quadratic forms are expanded, which float64 keeps exact to ~1e-12."""
        mu, U, d = self.means.double(), self.factors.double(), self.diag.double()  # (K, D), (K, D, r), (K, D)
        K, D, r = U.shape
        B = x.shape[0]
        a = d + sigma ** 2  # (K, D) diagonal part of Sigma_k + sigma^2 I
        inv_a, mu_a = 1 / a, mu / a  # (K, D), (K, D)
        maha = (x * x) @ inv_a.T - 2 * (x @ mu_a.T) + (mu * mu_a).sum(1)  # (B, K) (x - mu)^T diag(1/a) (x - mu)
        log_det = torch.log(a).sum(1)  # (K,)
        if r > 0:
            # Woodbury: (diag(a) + U U^T)^{-1} = A^{-1} - A^{-1} U M^{-1} U^T A^{-1}, M = I + U^T A^{-1} U (r x r).
            U_a = U * inv_a[..., None]  # (K, D, r) = A^{-1} U
            M = torch.einsum("kdr,kde->kre", U_a, U) + torch.eye(r, dtype=x.dtype, device=x.device)  # (K, r, r)
            L = torch.linalg.cholesky(M)  # (K, r, r)
            U_a_flat = U_a.transpose(0, 1).reshape(D, K * r)  # (D, K r)
            p = (x @ U_a_flat).reshape(B, K, r) - torch.einsum("kd,kdr->kr", mu, U_a)  # (B, K, r) U^T A^-1 (x - mu)
            q = torch.cholesky_solve(p.permute(1, 2, 0), L).permute(2, 0, 1)  # (B, K, r) M^-1 U^T A^-1 (x - mu)
            maha = maha - (p * q).sum(-1)
            log_det = log_det + 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)  # determinant lemma
        log_joint = log_prior - 0.5 * (maha + log_det + D * math.log(2 * math.pi))  # (B, K)
        resp = torch.softmax(log_joint, dim=1)  # (B, K)
        ainv_v = x * (resp @ inv_a) - resp @ mu_a  # (B, D) sum_k r_k diag(1/a_k) (x - mu_k)
        if r > 0:
            ainv_v = ainv_v - (resp[..., None] * q).reshape(B, K * r) @ U_a_flat.T  # minus sum_k r_k A^-1 U_k q_k
        return log_joint, resp, ainv_v


# Named presets that load_teacher accepts.

MIXTURE_SPECS: dict[str, dict[str, Any]] = {
    "mixture": dict(preset="default"),
    "mixture-cond": dict(preset="default", conditional=True),
    "mixture-demo": dict(preset="demo"),
    "mixture-demo-cond": dict(preset="demo", conditional=True),
}
