"""FID, KID and Inception Score through clean-fid, fully offline (docs/METRICS.md).

The metrics (``fid``, ``kid``, ``inception_score``) use clean-fid 0.1.35's own feature pipeline (its folder reader,
its resizers, its TorchScript Inception wrapper, its KID estimator). clean-fid downloads its Inception weights and
reference statistics on first use; we never let it: every asset is checked first and a missing one raises
``MissingAssetError`` naming the file, the folder it must be placed in and its URL. Where clean-fid looks:

- Inception: ``inception-2015-12-05.pt`` in ``/tmp`` (Windows: the current directory), see ``inception_dir()``.
- Reference statistics: ``<site-packages>/cleanfid/stats/{name}_{mode}_{split}_{res}.npz`` (keys ``mu``, ``sigma``;
  KID: ``..._kid.npz`` with ``feats``), see ``stats_dir()`` and ``reference_stats_path()``.

Published CIFAR-10 FIDs use ``mode='legacy_tensorflow'`` and 50k samples; EDM measures against the training set
(``dataset_split='train'``), the official GET numbers against the test set (``'test'``). ``mode='clean'`` gives
other numbers that must not be compared with either.
"""

from __future__ import annotations

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
from cleanfid.downloads_helper import inception_url
from cleanfid.fid import get_batch_features, get_folder_features, get_model_features, kernel_distance
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import build_resizer
from cleanfid.utils import EXTENSIONS
from torch import nn
from tqdm import tqdm

from get.io import save_npz
from get.metrics.frechet import (
    GaussianStats,
    as_features,
)

MODES = ("clean", "legacy_tensorflow")
INCEPTION_FILE = "inception-2015-12-05.pt"
STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats/"


class MissingAssetError(FileNotFoundError):
    """A weight or statistics file needed for offline evaluation is not where it must be placed."""


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


def _uint8_nchw(images, what: str) -> np.ndarray:
    """Validates an image array (N, H, W, C) or (N, C, H, W), C in {1, 3}, uint8 → (N, 3, H, W) uint8."""
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"{what}: images must be uint8 in [0, 255], got {arr.dtype} "
                         "(quantise generated images in [-1, 1] with get.images.to_uint8)")
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
            ref = as_features(f["feats"], str(path))
    else:
        ref = as_features(extract(reference, "reference"), "reference")
    feats = as_features(extract(source, "source"), "source")
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
    p = as_features(probs, "probabilities")
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
    feats = as_features(extract(source, "source"))
    stats = GaussianStats.from_features(feats)
    out_path = Path(out_path)
    if out_path.suffix != ".npz":
        raise ValueError(f"{out_path}: statistics files end in .npz")
    stats.save(out_path)
    if kid:
        save_npz(out_path.with_name(out_path.stem + "_kid.npz"), feats=feats)  # clean-fid's KID layout
    return stats
