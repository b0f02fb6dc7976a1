"""Exact sample-quality metrics against the analytic teacher (docs/METRICS.md).

``MixtureEvaluator`` compares samples with the analytic Gaussian-mixture teacher (``get.mixture.MixtureTeacher``):
Fréchet distance to the true distribution in pixel space (exact mean and covariance) and in a fixed random-feature
space, mode coverage and precision from the exact posterior and log-density, and the MSE of a one-step generator
against the teacher's ODE map. No network weights are needed, so these run anywhere and are exact up to the sampling
noise of the samples.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from get.metrics.frechet import (
    GaussianReference,
    GaussianStats,
)


class RandomConvFeatures(nn.Module):
    """A fixed random convolutional feature map for Fréchet distances between image sets of the analytic teacher.

    Three 3×3 stride-2 convolutions (C → 32 → 64 → 128 channels, padding 1, no bias), each followed by ReLU, with
    He-normal weights N(0, 2/fan_in) drawn from a CPU ``torch.Generator`` seeded with ``seed`` (so the map is the
    same on every machine). Features: the global average of each layer's activations (32 + 64 + 128) and the 2×2
    average pool of the last layer (4·128), concatenated: 736 dimensions, float32. Inputs: images (B, C, R, R) in
    the teacher's units (about [-1, 1]), any R ≥ 8. Untrained on purpose: like Inception it is nonlinear and local,
    unlike Inception it needs no weights; its numbers are comparable only between runs with the same seed.
    """

    widths = (32, 64, 128)

    def __init__(self, channels: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        fan_in, weights = channels, []
        for width in self.widths:
            weights.append(torch.randn(width, fan_in, 3, 3, generator=g) * math.sqrt(2 / (9 * fan_in)))
            fan_in = width
        self.weights = nn.ParameterList([nn.Parameter(w, requires_grad=False) for w in weights])
        self.seed = seed

    @property
    def dim(self) -> int:
        return sum(self.widths) + 4 * self.widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, feats = x.to(self.weights[0].dtype), []
        for w in self.weights:
            h = F.relu(F.conv2d(h, w, stride=2, padding=1))  # (B, width, R', R')
            feats.append(h.mean(dim=(2, 3)))  # (B, width)
        feats.append(F.adaptive_avg_pool2d(h, 2).flatten(1))  # (B, 4·128)
        return torch.cat(feats, dim=1)  # (B, dim)


def _check_samples(x, teacher, what: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    shape = (teacher.channels, teacher.resolution, teacher.resolution)
    if x.ndim != 4 or tuple(x.shape[1:]) != shape:
        raise ValueError(f"{what}: expected images (N, {', '.join(map(str, shape))}), got {tuple(x.shape)}")
    if len(x) < 2:
        raise ValueError(f"{what}: need at least 2 images, got {len(x)}")
    bad = int((~torch.isfinite(x.reshape(len(x), -1))).any(dim=1).sum())
    if bad:
        raise ValueError(f"{what}: {bad} of {len(x)} images have non-finite values")
    return x.detach().to("cpu", torch.float64)


class MixtureEvaluator:
    """Every exact metric of samples from a generator against the analytic teacher (``MixtureTeacher``).

    Built once per teacher (it caches the exact moments, the square root of the exact covariance, the feature
    network and the features of a reference sample), then called on any number of sample sets.

    Metrics (keys of the returned dict):
        n: number of samples.
        fd_pixel: Fréchet distance in pixel space between N(sample mean, unbiased sample covariance) and the exact
            mean and covariance of the mixture (float64). Exact samples give a small positive value, the finite-n
            bias ≈ (tr Σ + Σ_ij Var(y_i y_j)/(2(λ_i + λ_j)))/n (y: centred data in Σ's eigenbasis, λ its eigenvalues).
        fd_feature: Fréchet distance in the feature space of ``RandomConvFeatures(seed=feature_seed)`` against
            ``n_ref`` exact samples of the mixture (drawn with ``ref_seed``); includes the bias of both sample sets.
        log_prob: mode precision, the mean exact log-density of the samples, in nats per dimension.
        precision: share of samples whose exact log-density is at least the 1% quantile of the log-densities of the
            reference sample (exact samples score ≈ 0.99; off-manifold samples 0).
        mode_shares: share of samples per component, by posterior responsibility p(k | x) averaged over samples.
        mode_tv: total variation ½ Σ_k |share_k − π_k| between those shares and the mixture weights (0 = perfect).
        modes_covered: number of components with share_k ≥ ½ π_k.
        class_accuracy: with ``class_labels`` (conditional teachers): mean posterior mass on the components of
            each sample's class.
        mse: with ``targets``: mean squared error per element against paired targets (e.g. the teacher's ODE
            outputs for the same noise), float64.

    Args:
        teacher: a ``get.mixture.MixtureTeacher``.
        n_ref: size of the exact reference sample (feature FD and the precision threshold).
        ref_seed: seed of the reference sample (CPU generator).
        feature_seed: seed of the random feature network.
        batch_size: images per batch for the feature network and the exact densities.
    """

    def __init__(self, teacher, n_ref: int = 10_000, ref_seed: int = 2**31 - 1, feature_seed: int = 0,
                 batch_size: int = 1000):
        for attr in ("mean", "covariance", "log_prob", "responsibilities", "sample", "log_weights"):
            if not hasattr(teacher, attr):
                raise TypeError(f"MixtureEvaluator needs the analytic teacher (MixtureTeacher); "
                                f"{type(teacher).__name__} has no {attr!r}")
        if n_ref < 100:
            raise ValueError(f"n_ref must be >= 100 for a stable reference, got {n_ref}")
        self.teacher = copy.deepcopy(teacher).to("cpu")  # exact metrics on the CPU; the caller's teacher stays put
        self.batch_size = batch_size
        self.weights = teacher.log_weights.detach().double().exp().cpu().numpy()  # (K,)
        self.pixel_ref = GaussianReference(teacher.mean().reshape(-1).cpu().numpy(), teacher.covariance().cpu().numpy())
        self.features = RandomConvFeatures(teacher.channels, feature_seed).eval()
        ref, _ = teacher.sample(n_ref, generator=torch.Generator().manual_seed(ref_seed))  # (n_ref, C, R, R)
        self.feature_ref = GaussianStats.from_features(self._features(ref))
        self.log_prob_q01 = float(torch.quantile(self._log_prob(ref), 0.01))
        self.config = dict(n_ref=n_ref, ref_seed=ref_seed, feature_seed=feature_seed)

    def _batches(self, x: torch.Tensor):
        return (x[i:i + self.batch_size] for i in range(0, len(x), self.batch_size))

    @torch.no_grad()
    def _features(self, x: torch.Tensor) -> np.ndarray:
        return torch.cat([self.features(b) for b in self._batches(x)]).double().numpy()  # (N, dim)

    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.teacher.log_prob(b) for b in self._batches(x)])  # (N,) float64

    def __call__(self, samples, targets=None, class_labels=None) -> dict:
        """Metrics of ``samples`` (N, C, R, R) (and of paired ``targets`` (N, C, R, R), labels (N,) int64)."""
        x = _check_samples(samples, self.teacher, "samples")
        n, dim = len(x), x[0].numel()
        resp = torch.cat([self.teacher.responsibilities(b) for b in self._batches(x)]).numpy()  # (N, K)
        shares = resp.mean(axis=0)  # (K,)
        log_prob = self._log_prob(x)  # (N,)
        out = dict(
            n=n,
            fd_pixel=self.pixel_ref.frechet_distance(x.reshape(n, -1).numpy()),
            fd_feature=GaussianStats.from_features(self._features(x)).frechet_distance(self.feature_ref),
            log_prob=float(log_prob.mean()) / dim,
            precision=float((log_prob >= self.log_prob_q01).double().mean()),
            mode_shares=shares.tolist(),
            mode_tv=float(0.5 * np.abs(shares - self.weights).sum()),
            modes_covered=int((shares >= 0.5 * self.weights).sum()),
        )
        if class_labels is not None:
            labels = torch.as_tensor(class_labels).cpu()
            if self.teacher.label_dim == 0:
                raise ValueError("class_labels given but the teacher is unconditional")
            if labels.shape != (n,) or labels.dtype != torch.int64:
                raise ValueError(f"class_labels must be int64 (N,) = ({n},), got {labels.dtype} {tuple(labels.shape)}")
            in_class = (self.teacher.class_of.cpu()[None, :] == labels[:, None]).numpy()  # (N, K)
            out["class_accuracy"] = float((resp * in_class).sum(axis=1).mean())
        if targets is not None:
            y = _check_samples(targets, self.teacher, "targets")
            if len(y) != n:
                raise ValueError(f"targets: {len(y)} images for {n} samples; they must be paired one to one")
            out["mse"] = float((x - y).square().mean())
        return out


def evaluate_mixture(teacher, samples, targets=None, class_labels=None, **kwargs) -> dict:
    """One-shot ``MixtureEvaluator(teacher, **kwargs)(samples, targets, class_labels)``; see ``MixtureEvaluator``."""
    return MixtureEvaluator(teacher, **kwargs)(samples, targets, class_labels)
