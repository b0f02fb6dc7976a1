"""Sample-quality metrics: FID, KID and IS through clean-fid, and exact metrics of the analytic teacher.

Two families live here.

1. Image metrics (``fid``, ``kid``, ``inception_score``) computed with clean-fid 0.1.35's own feature pipeline
   (its folder reader, its resizers, its TorchScript Inception wrapper, its KID estimator). clean-fid downloads its
   Inception weights and reference statistics on first use; we never let it: every asset is checked first and a
   missing one raises ``MissingAssetError`` naming the file, the folder it must be placed in and its URL
   (``../shared/spec/EDM.md`` §11.2). Where clean-fid looks:

   - Inception: ``inception-2015-12-05.pt`` in ``/tmp`` (Windows: the current directory), see ``inception_dir()``.
   - Reference statistics: ``<site-packages>/cleanfid/stats/{name}_{mode}_{split}_{res}.npz`` (keys ``mu``,
     ``sigma``; KID: ``..._kid.npz`` with ``feats``), see ``stats_dir()`` and ``reference_stats_path()``.

   EDM's and the GET paper's CIFAR-10 numbers correspond to ``mode='legacy_tensorflow'`` against the training set
   with 50k samples; ``mode='clean'`` gives different numbers that must not be compared with them.

2. Exact metrics of the analytic Gaussian-mixture teacher (``MixtureEvaluator``): Fréchet distance to the true
   distribution in pixel space (exact mean and covariance) and in a fixed random-feature space, mode coverage and
   precision from the exact posterior and log-density, and the MSE of a one-step generator against the teacher's ODE
   map. No network weights are needed, so these run anywhere and are exact up to sampling noise of the samples.

Fréchet distance numerics. FD = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½. We compute the last trace from
the eigenvalues of the symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½ (``numpy.linalg.eigh``, float64) instead of
``scipy.linalg.sqrtm(Σ₁ Σ₂)``: the product Σ₁Σ₂ is not symmetric, its Schur-based square root is several times
slower and returns spurious imaginary parts (clean-fid then needs an ε·I retry and a tolerance on the imaginary
part), while the symmetric eigen-decomposition is backward stable, needs no regularisation for singular covariances
(n ≤ dim), and only its rounding-level negative eigenvalues (|λ| ≲ 1e-16·‖Σ‖) are clipped to zero. Both formulas
agree to ~1e-10 relative on well-conditioned inputs (tested against clean-fid's ``frechet_distance``).
"""

from __future__ import annotations

import copy
import io
import math
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from glob import glob
from pathlib import Path

import cleanfid
import numpy as np
import torch
import torch.nn.functional as F
from cleanfid.downloads_helper import inception_url
from cleanfid.fid import get_batch_features, get_folder_features, get_model_features, kernel_distance
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import build_resizer
from cleanfid.utils import EXTENSIONS
from torch import nn
from tqdm import tqdm

from get.io import atomic_write_bytes

MODES = ("clean", "legacy_tensorflow")
INCEPTION_FILE = "inception-2015-12-05.pt"
STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats/"


class MissingAssetError(FileNotFoundError):
    """A weight or statistics file needed for offline evaluation is not where it must be placed."""


# ---------------------------------------------------------------------------------------------------------------
# Fréchet distance and Gaussian statistics


def _sym_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root by eigen-decomposition; rounding-level negative eigenvalues are clipped."""
    lam, v = np.linalg.eigh((sigma + sigma.T) / 2)  # (D,), (D, D)
    return (v * np.sqrt(np.clip(lam, 0, None))) @ v.T


def _trace_sqrt_psd(m: np.ndarray) -> float:
    """tr m^½ for a symmetric PSD matrix m (eigenvalues clipped at zero)."""
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(lam, 0, None)).sum())


def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{what}: mean has shape {mu.shape} and covariance {sigma.shape}; expected (D,) and (D, D)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{what}: mean or covariance has non-finite entries")
    return mu, sigma


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64 (eigen-based, see module docstring).

    Args:
        mu1, mu2: means (D,).
        sigma1, sigma2: covariances (D, D), symmetric positive semi-definite (singular allowed).

    Returns:
        ‖mu1 − mu2‖² + tr(sigma1 + sigma2 − 2 (sigma1^½ sigma2 sigma1^½)^½).
    """
    mu1, sigma1 = _check_gaussian(mu1, sigma1, "first Gaussian")
    mu2, sigma2 = _check_gaussian(mu2, sigma2, "second Gaussian")
    if mu1.shape != mu2.shape:
        raise ValueError(f"the two Gaussians have different dimensions: {mu1.shape[0]} and {mu2.shape[0]}")
    root1 = _sym_sqrt(sigma1)  # (D, D)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * _trace_sqrt_psd(root1 @ sigma2 @ root1))


def _as_features(feats, what: str = "features") -> np.ndarray:
    feats = feats.detach().cpu().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
    feats = feats.astype(np.float64).reshape(len(feats), -1)  # (N, D)
    if len(feats) < 2:
        raise ValueError(f"{what}: need at least 2 samples for a covariance, got {len(feats)}")
    if not np.isfinite(feats).all():
        raise ValueError(f"{what}: non-finite values")
    return feats


@dataclass
class GaussianStats:
    """Mean and unbiased covariance of a feature set (float64), in clean-fid's npz layout (``mu``, ``sigma``)."""

    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)

    @classmethod
    def from_features(cls, feats) -> GaussianStats:
        """Statistics of features (N, ...) flattened to (N, D), as clean-fid computes them (np.mean, np.cov)."""
        feats = _as_features(feats)
        return cls(feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1]))

    @classmethod
    def load(cls, path: str | os.PathLike) -> GaussianStats:
        """Reads an npz with keys ``mu`` and ``sigma`` (clean-fid's and pytorch-fid's layout)."""
        with np.load(path, allow_pickle=False) as f:
            missing = {"mu", "sigma"} - set(f.files)
            if missing:
                raise ValueError(f"{path}: not a statistics file, keys {sorted(f.files)} lack {sorted(missing)}")
            mu, sigma = _check_gaussian(f["mu"], f["sigma"], str(path))
        return cls(mu, sigma)

    def save(self, path: str | os.PathLike) -> None:
        """Writes ``mu`` and ``sigma`` to an npz atomically."""
        _atomic_savez(path, mu=self.mu, sigma=self.sigma)

    def frechet_distance(self, other: GaussianStats) -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)


def _atomic_savez(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


class GaussianReference:
    """A fixed Gaussian (e.g. the exact moments of the analytic teacher) to which many sample sets are compared.

    The square root of the reference covariance is computed once. For n samples in D dimensions the sample
    covariance has rank ≤ n − 1, so when n ≤ D the trace term is taken from the n×n Gram matrix
    K Kᵀ/(n − 1), K = X_c Σ_ref^½, which has the same non-zero eigenvalues as Σ_ref^½ Σ̂ Σ_ref^½ (exact, cheaper).
    """

    def __init__(self, mu, sigma):
        self.mu, self.sigma = _check_gaussian(mu, sigma, "reference Gaussian")
        self.root = _sym_sqrt(self.sigma)  # (D, D)
        self.trace = float(np.trace(self.sigma))

    def frechet_distance(self, feats) -> float:
        """FD between N(mean, unbiased covariance) of ``feats`` (N, D) and the reference."""
        x = _as_features(feats)  # (N, D)
        if x.shape[1] != self.mu.shape[0]:
            raise ValueError(f"features have dimension {x.shape[1]}, the reference {self.mu.shape[0]}")
        n = x.shape[0]
        mu = x.mean(axis=0)
        xc = x - mu  # (N, D)
        if n <= x.shape[1]:
            k = xc @ self.root  # (N, D)
            tr_cross = _trace_sqrt_psd(k @ k.T / (n - 1))
            tr_sample = float((xc * xc).sum() / (n - 1))
        else:
            sigma = xc.T @ xc / (n - 1)  # (D, D)
            tr_cross = _trace_sqrt_psd(self.root @ sigma @ self.root)
            tr_sample = float(np.trace(sigma))
        diff = mu - self.mu
        return float(diff @ diff + tr_sample + self.trace - 2 * tr_cross)


# ---------------------------------------------------------------------------------------------------------------
# Offline assets of clean-fid


def inception_dir() -> Path:
    """The folder where clean-fid looks for (and would download) ``inception-2015-12-05.pt``."""
    return Path("./" if platform.system() == "Windows" else "/tmp")


def stats_dir() -> Path:
    """The folder where clean-fid looks for (and would download) reference statistics."""
    return Path(os.path.dirname(cleanfid.__file__)) / "stats"


def reference_stats_filename(dataset: str, res: int, split: str = "train", mode: str = "clean", kid: bool = False):
    """clean-fid's name for the statistics of a named data set, e.g. ``cifar10_legacy_tensorflow_train_32.npz``."""
    _check_mode(mode)
    res = "na" if split == "custom" else res
    return f"{dataset}_{mode}_{split}_{res}{'_kid' if kid else ''}.npz".lower()


def reference_stats_path(dataset: str, res: int, split: str = "train", mode: str = "clean", kid: bool = False,
                         stats_folder: str | os.PathLike | None = None) -> Path:
    """Path of a named data set's statistics; raises ``MissingAssetError`` (what to place where) if absent."""
    name = reference_stats_filename(dataset, res, split, mode, kid)
    folder = Path(stats_folder) if stats_folder is not None else stats_dir()
    path = folder / name
    if not path.is_file():
        raise MissingAssetError(
            f"reference statistics for {dataset} ({split}, {res}px, mode {mode}) not found: place {name} at {path} "
            f"(clean-fid's file, from {STATS_URL}{name}), or build it from the images with "
            f"get.metrics.make_reference_stats(images, '{path}', mode='{mode}'{', kid=True' if kid else ''})"
        )
    return path


def inception_path(folder: str | os.PathLike | None = None) -> Path:
    """Path of the Inception TorchScript file; raises ``MissingAssetError`` (what to place where) if absent."""
    path = (Path(folder) if folder is not None else inception_dir()) / INCEPTION_FILE
    if not path.is_file():
        raise MissingAssetError(
            f"Inception weights not found: place {INCEPTION_FILE} (from {inception_url}) at {path}"
            f"{'' if folder is not None else ' (where clean-fid looks for it)'}, or pass inception_dir=<folder>"
        )
    return path


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown FID mode {mode!r}; choose one of {MODES}")


def _default_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def inception_features(mode: str = "clean", device=None, inception_dir: str | os.PathLike | None = None) -> nn.Module:
    """clean-fid's Inception feature network (2048-d) for ``mode``, loaded without any download.

    Input: float (B, 3, H, W) in [0, 255]; 299×299 in clean mode (resized outside), native size in legacy_tensorflow.
    """
    _check_mode(mode)
    path = inception_path(inception_dir)
    net = InceptionV3W(str(path.parent), download=False, resize_inside=(mode == "legacy_tensorflow"))
    return net.to(_default_device(device)).eval()


class InceptionProbs(nn.Module):
    """Softmax output (1008 classes) of the TorchScript Inception without the output bias, as StyleGAN2-ADA's and
    EDM's Inception Score do; images float (B, 3, H, W) in [0, 255] at native size (resized inside)."""

    def __init__(self, inception_dir: str | os.PathLike | None = None):
        super().__init__()
        self.base = torch.jit.load(str(inception_path(inception_dir)), map_location="cpu").eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x, no_output_bias=True)  # (B, 1008)


# ---------------------------------------------------------------------------------------------------------------
# Image sources → features


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """EDM's quantisation of images in [-1, 1]: round(x·127.5 + 127.5) clipped to [0, 255], as uint8."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def _uint8_nchw(images, what: str) -> np.ndarray:
    """Validates an image array (N, H, W, C) or (N, C, H, W), C in {1, 3}, uint8 → (N, 3, H, W) uint8."""
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"{what}: images must be uint8 in [0, 255], got {arr.dtype} "
                         "(quantise generated images in [-1, 1] with get.metrics.to_uint8)")
    if arr.ndim != 4:
        raise ValueError(f"{what}: expected a 4-d image array (N, H, W, C) or (N, C, H, W), got shape {arr.shape}")
    if arr.shape[-1] in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    elif arr.shape[1] not in (1, 3):
        raise ValueError(f"{what}: cannot find a channel axis of size 1 or 3 in shape {arr.shape}")
    if len(arr) == 0:
        raise ValueError(f"{what}: no images")
    return np.ascontiguousarray(np.repeat(arr, 3, axis=1) if arr.shape[1] == 1 else arr)  # (N, 3, H, W)


def load_npz_images(path: str | os.PathLike) -> np.ndarray:
    """uint8 images from an npz holding one array, or a key ``images`` / ``arr_0`` (ADM's layout) → (N, 3, H, W)."""
    with np.load(path, allow_pickle=False) as f:
        keys = f.files
        key = next((k for k in ("images", "arr_0") if k in keys), keys[0] if len(keys) == 1 else None)
        if key is None:
            raise ValueError(f"{path}: expected one array or a key 'images'/'arr_0' in the npz, found keys {keys}")
        return _uint8_nchw(f[key], f"{path}[{key}]")


@dataclass
class _Extractor:
    """How to turn any image source into features: the network, clean-fid's mode and the loop settings."""

    model: Callable[[torch.Tensor], torch.Tensor]
    mode: str
    device: torch.device
    batch_size: int = 64
    num_workers: int = 0
    num_gen: int | None = None
    z_dim: int | None = None
    seed: int = 0
    verbose: bool = True

    def __call__(self, source, what: str) -> np.ndarray:
        with torch.no_grad():
            if callable(source) and not isinstance(source, (str, os.PathLike)):
                return self._generator(source, what)
            if isinstance(source, (str, os.PathLike)):
                path = Path(source)
                if not path.exists():
                    raise FileNotFoundError(f"{what}: {path} does not exist")
                if path.is_dir() or path.suffix == ".zip":
                    return self._folder(path, what)
                if path.suffix == ".npz":
                    return self._array(load_npz_images(path))
                raise ValueError(f"{what}: {path} is neither a folder, a .zip nor an .npz of images")
            return self._array(_uint8_nchw(source, what))

    def _folder(self, path: Path, what: str) -> np.ndarray:
        if path.is_dir() and not any(glob(os.path.join(path, f"**/*.{e}"), recursive=True) for e in EXTENSIONS):
            raise ValueError(f"{what}: no images ({', '.join(sorted(EXTENSIONS))}) under {path}")
        return get_folder_features(str(path), self.model, num_workers=self.num_workers, batch_size=self.batch_size,
                                   device=self.device, mode=self.mode, verbose=self.verbose,
                                   description=f"features {path.name}: ")

    def _generator(self, gen, what: str) -> np.ndarray:
        if self.num_gen is None or self.z_dim is None:
            raise ValueError(f"{what}: a generator function needs num_gen and z_dim")
        # clean-fid draws z from the global CPU generator: seed it for reproducibility, restore it afterwards.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return get_model_features(gen, self.model, mode=self.mode, z_dim=self.z_dim, num_gen=self.num_gen,
                                      batch_size=self.batch_size, device=self.device, verbose=self.verbose)

    def _array(self, images: np.ndarray) -> np.ndarray:
        """Same per-image path as clean-fid's folder reader (uint8 HWC → its resizer → float CHW)."""
        resize = build_resizer(self.mode)
        feats = []
        for start in tqdm(range(0, len(images), self.batch_size), desc="features", disable=not self.verbose):
            batch = images[start:start + self.batch_size]  # (B, 3, H, W) uint8
            if self.mode == "legacy_tensorflow":
                x = torch.from_numpy(batch).float()
            else:
                x = torch.stack([torch.from_numpy(resize(img.transpose(1, 2, 0)).transpose(2, 0, 1)) for img in batch])
            feats.append(get_batch_features(x, self.model, self.device))
        return np.concatenate(feats)


def _make_extractor(mode, feature_extractor, device, inception_dir, **loop) -> _Extractor:
    _check_mode(mode)
    if device is None and isinstance(feature_extractor, nn.Module):  # run where the given network lives
        device = next(iter([*feature_extractor.parameters(), *feature_extractor.buffers()]), torch.empty(0)).device
    device = _default_device(device)
    model = feature_extractor if feature_extractor is not None else inception_features(mode, device, inception_dir)
    return _Extractor(model=model, mode=mode, device=device, **loop)


def image_features(source, *, mode: str = "clean", feature_extractor=None, device=None, inception_dir=None,
                   batch_size: int = 64, num_workers: int = 0, num_gen: int | None = None, z_dim: int | None = None,
                   seed: int = 0, verbose: bool = True) -> np.ndarray:
    """Features (N, D) of an image source through clean-fid's pipeline for ``mode``.

    Args:
        source: a folder (or .zip) of images; an .npz of uint8 images; a uint8 array/tensor (N, H, W, C) or
            (N, C, H, W); or a generator function ``G(z) -> (B, 3, H, W)`` in [0, 255] as clean-fid calls it, with z
            (B, z_dim) from the global CPU generator seeded with ``seed`` (its state is restored afterwards).
        mode: 'clean' or 'legacy_tensorflow'.
        feature_extractor: a network taking float (B, 3, H, W) in [0, 255] (299×299 in clean mode) → (B, D);
            default clean-fid's Inception, which must be present (see ``inception_path``).
        num_gen, z_dim: sample count and latent size, for a generator source only.
    """
    extract = _make_extractor(mode, feature_extractor, device, inception_dir, batch_size=batch_size,
                              num_workers=num_workers, num_gen=num_gen, z_dim=z_dim, seed=seed, verbose=verbose)
    return extract(source, "source")


# ---------------------------------------------------------------------------------------------------------------
# FID, KID, IS


def _reference_stats(reference, dataset, dataset_res, dataset_split, mode, stats_folder, extract) -> GaussianStats:
    if (reference is None) == (dataset is None):
        raise ValueError("give exactly one of reference (images, a generator or a stats .npz) and dataset (a name)")
    if dataset is not None:
        if dataset_res is None:
            raise ValueError(f"dataset {dataset!r} needs dataset_res (the resolution of its statistics, e.g. 32)")
        return GaussianStats.load(reference_stats_path(dataset, dataset_res, dataset_split, mode, False, stats_folder))
    if isinstance(reference, (str, os.PathLike)) and str(reference).endswith(".npz"):
        with np.load(reference, allow_pickle=False) as f:
            if "mu" in f.files:
                return GaussianStats.load(reference)
    return GaussianStats.from_features(extract(reference, "reference"))


def fid(source, reference=None, *, dataset: str | None = None, dataset_res: int | None = None,
        dataset_split: str = "train", mode: str = "clean", feature_extractor=None, device=None, inception_dir=None,
        stats_folder=None, batch_size: int = 64, num_workers: int = 0, num_gen: int | None = None,
        z_dim: int | None = None, seed: int = 0, verbose: bool = True) -> float:
    """Fréchet Inception Distance through clean-fid, fully offline once the assets are in place.

    Args:
        source: images to evaluate (see ``image_features`` for the accepted kinds).
        reference: other images (same kinds), or an .npz of statistics (``mu``, ``sigma``).
        dataset, dataset_res, dataset_split: instead of ``reference``, clean-fid's statistics of a named data set,
            e.g. ``dataset='cifar10', dataset_res=32, dataset_split='train'`` (EDM's protocol with
            ``mode='legacy_tensorflow'`` and 50k samples); looked up in ``stats_folder`` (default clean-fid's).
        mode: 'clean' or 'legacy_tensorflow'.
        feature_extractor: replaces the Inception (float (B, 3, H, W) in [0, 255] → (B, D)).
        num_gen, z_dim, seed: for generator sources.

    Raises:
        MissingAssetError: the Inception weights or the named statistics are absent (the message says what to place
            where); nothing is ever downloaded.
    """
    extract = _make_extractor(mode, feature_extractor, device, inception_dir, batch_size=batch_size,
                              num_workers=num_workers, num_gen=num_gen, z_dim=z_dim, seed=seed, verbose=verbose)
    ref = _reference_stats(reference, dataset, dataset_res, dataset_split, mode, stats_folder, extract)
    feats = GaussianStats.from_features(extract(source, "source"))
    if feats.mu.shape != ref.mu.shape:
        raise ValueError(f"source features have dimension {feats.mu.shape[0]}, the reference {ref.mu.shape[0]}")
    return feats.frechet_distance(ref)


def kid(source, reference=None, *, dataset: str | None = None, dataset_res: int | None = None,
        dataset_split: str = "train", mode: str = "clean", feature_extractor=None, device=None, inception_dir=None,
        stats_folder=None, batch_size: int = 64, num_workers: int = 0, num_gen: int | None = None,
        z_dim: int | None = None, seed: int = 0, verbose: bool = True) -> float:
    """Kernel Inception Distance with clean-fid's estimator (cubic polynomial kernel, 100 subsets of ≤ 1000).

    Same arguments as ``fid``; a named data set needs clean-fid's ``..._kid.npz`` (key ``feats``). The subset draw
    uses numpy's global generator seeded with ``seed`` (its state is restored afterwards).
    """
    extract = _make_extractor(mode, feature_extractor, device, inception_dir, batch_size=batch_size,
                              num_workers=num_workers, num_gen=num_gen, z_dim=z_dim, seed=seed, verbose=verbose)
    if (reference is None) == (dataset is None):
        raise ValueError("give exactly one of reference (images or a generator) and dataset (a name)")
    if dataset is not None:
        if dataset_res is None:
            raise ValueError(f"dataset {dataset!r} needs dataset_res (the resolution of its statistics, e.g. 32)")
        path = reference_stats_path(dataset, dataset_res, dataset_split, mode, True, stats_folder)
        with np.load(path, allow_pickle=False) as f:
            if "feats" not in f.files:
                raise ValueError(f"{path}: a KID file needs the key 'feats', found {f.files}")
            ref = _as_features(f["feats"], str(path))
    else:
        ref = _as_features(extract(reference, "reference"), "reference")
    feats = _as_features(extract(source, "source"), "source")
    if feats.shape[1] != ref.shape[1]:
        raise ValueError(f"source features have dimension {feats.shape[1]}, the reference {ref.shape[1]}")
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return kernel_distance(ref, feats)
    finally:
        np.random.set_state(state)


def inception_score_from_probs(probs, splits: int = 10) -> tuple[float, float]:
    """Inception Score exp(E KL(p(y|x) ‖ p(y))) per split, mean and std over splits (Salimans et al.'s protocol).

    Args:
        probs: class probabilities (N, K); split into ``splits`` contiguous parts.
    """
    p = _as_features(probs, "probabilities")
    if len(p) < splits:
        raise ValueError(f"{len(p)} samples cannot be split into {splits} parts")
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1, atol=1e-3):
        raise ValueError("probabilities must be non-negative and sum to 1 per row")
    scores = []
    for i in range(splits):
        part = p[i * len(p) // splits:(i + 1) * len(p) // splits]  # (n, K)
        log_part = np.log(np.clip(part, 1e-300, None))  # p·log p → 0 for p = 0
        kl = (part * (log_part - np.log(part.mean(axis=0, keepdims=True)))).sum(axis=1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def inception_score(source, *, splits: int = 10, classifier=None, device=None, inception_dir=None,
                    batch_size: int = 64, num_workers: int = 0, num_gen: int | None = None, z_dim: int | None = None,
                    seed: int = 0, verbose: bool = True) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits``) of an image source, StyleGAN2-ADA/EDM style.

    Images go at native size to the TorchScript Inception (its own TF-style resize), softmax without output bias.

    Args:
        source: as in ``image_features``.
        classifier: replaces the Inception: float (B, 3, H, W) in [0, 255] → probabilities (B, K).
    """
    device = _default_device(device)
    model = classifier if classifier is not None else InceptionProbs(inception_dir).to(device)
    extract = _Extractor(model=model, mode="legacy_tensorflow", device=device, batch_size=batch_size,
                         num_workers=num_workers, num_gen=num_gen, z_dim=z_dim, seed=seed, verbose=verbose)
    return inception_score_from_probs(extract(source, "source"), splits)


def make_reference_stats(source, out_path: str | os.PathLike, *, mode: str = "clean", kid: bool = False,
                         feature_extractor=None, device=None, inception_dir=None, batch_size: int = 64,
                         num_workers: int = 0, verbose: bool = True) -> GaussianStats:
    """Computes reference statistics of an image source and writes them atomically in clean-fid's layout.

    Name the file ``reference_stats_filename(dataset, res, split, mode)`` inside ``stats_dir()`` to make it the
    statistics clean-fid (and ``fid(dataset=...)``) use for that data set; with ``kid=True`` also writes the
    features to the matching ``_kid.npz`` next to it.
    """
    extract = _make_extractor(mode, feature_extractor, device, inception_dir, batch_size=batch_size,
                              num_workers=num_workers, verbose=verbose)
    feats = _as_features(extract(source, "source"))
    stats = GaussianStats.from_features(feats)
    out_path = Path(out_path)
    if out_path.suffix != ".npz":
        raise ValueError(f"{out_path}: statistics files end in .npz")
    stats.save(out_path)
    if kid:
        _atomic_savez(out_path.with_name(out_path.stem + "_kid.npz"), feats=feats)  # clean-fid's KID layout
    return stats


# ---------------------------------------------------------------------------------------------------------------
# Exact metrics of the analytic teacher


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
        teacher: a ``get.teachers.MixtureTeacher``.
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
