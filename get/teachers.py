"""Teachers: the protocol every teacher satisfies, the converted-teacher format, and ``load_teacher``.

A teacher is EDM's denoiser D(x; sigma, class_labels) plus a few attributes (see :class:`Teacher`). Two kinds exist:
the EDM networks (``get.edm``: EDMPrecond / VPPrecond / VEPrecond / iDDPMPrecond, read safely from the official
pickles) and the analytic Gaussian mixture (``get.mixture.MixtureTeacher``). Either kind converts to our own format,
a folder with ``model.safetensors`` and ``config.json`` (:func:`save_teacher`, :func:`load_converted`), that loads
without any pickle. docs/EDM.md describes the formats.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file

from get.edm.checkpoint import OFFICIAL_CHECKPOINTS, load_edm, load_state_dict_strict
from get.edm.precond import PRECONDITIONERS
from get.io import save_safetensors, tensors_sha256, write_json
from get.mixture import MIXTURE_SPECS, MixtureTeacher

__all__ = ["Teacher", "load_teacher", "save_teacher", "load_converted"]


@runtime_checkable
class Teacher(Protocol):
    """What data generation, distillation and metrics may rely on.

    Attributes:
        name: a short name ('edm-cifar10-32x32-cond-vp', 'mixture-demo', ...).
        resolution: image side R (pixels); images are (B, channels, R, R) in about [-1, 1].
        channels: image channels C.
        label_dim: number of classes; 0 = unconditional.
        sigma_min, sigma_max: noise levels (EDM units) the denoiser supports; the sampler clips its schedule to them.
    """

    name: str
    resolution: int
    channels: int
    label_dim: int
    sigma_min: float
    sigma_max: float

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """D(x; sigma): x (B, C, R, R), sigma (B,) or scalar, class_labels one-hot (B, label_dim) or None."""
        ...

    def round_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The noise level the denoiser really uses for ``sigma`` (identity except for iDDPM's discrete grid)."""
        ...

    def bottleneck(self, x: torch.Tensor, sigma: torch.Tensor | float,
                   class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Features (B, C', R', R') at the denoiser's bottleneck (DMD2's GAN head reads them)."""
        ...

    def identity(self) -> dict[str, Any]:
        """``{"name": str, "sha256": hash of weights/parameters, "config": dict}`` for manifests."""
        ...

    def to(self, device: torch.device | str) -> Teacher:
        ...


# ------------------------------------------------------------------------------------------------------------------
# The converted-teacher format: safetensors + JSON.

_FORMAT = "get-teacher"


def save_teacher(teacher, directory: str | Path) -> Path:
    """Writes ``model.safetensors`` (the state dict) and ``config.json`` (class, constructor keywords, name, hashes)
    into ``directory`` atomically; ``load_teacher(directory)`` rebuilds the teacher without any pickle."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    identity = teacher.identity()
    config = {"format": _FORMAT, "version": 1, "name": identity["name"], **identity["config"],
              "sha256": identity["sha256"], "source": getattr(teacher, "source", None)}
    save_safetensors(directory / "model.safetensors", teacher.state_dict())
    write_json(directory / "config.json", config)
    return directory


def load_converted(directory: str | Path):
    """Reads a folder written by :func:`save_teacher`, verifying the weights' sha256."""
    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{directory}: a converted teacher needs config.json and model.safetensors")
    config = json.loads(config_path.read_text())
    if config.get("format") != _FORMAT:
        raise ValueError(f"{config_path}: format is {config.get('format')!r}, expected {_FORMAT!r}")
    classes = {**PRECONDITIONERS, "MixtureTeacher": MixtureTeacher}
    if config.get("class_name") not in classes:
        raise ValueError(f"{config_path}: unknown class_name {config.get('class_name')!r}; known: {sorted(classes)}")
    with torch.device("meta" if config["class_name"] in PRECONDITIONERS else "cpu"):
        teacher = classes[config["class_name"]](**{**config["kwargs"], "name": config["name"]})
    tensors = load_file(str(weights_path))
    if tensors_sha256(tensors) != config["sha256"]:
        raise ValueError(f"{weights_path}: sha256 of the weights does not match config.json (corrupted file?)")
    load_state_dict_strict(teacher, tensors, str(weights_path))
    teacher.source = config.get("source")
    return teacher.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------------------
# Loading any teacher from a string.


def load_teacher(spec: str, device: torch.device | str = "cpu") -> Teacher:
    """Any teacher from a string, in eval mode with gradients off, on ``device``.

    Args:
        spec: 'mixture' / 'mixture-cond' / 'mixture-demo' / 'mixture-demo-cond' (the analytic teacher presets);
            an official EDM name such as 'edm-cifar10-32x32-cond-vp' (downloaded into the cache, see
            ``get.edm.checkpoint``); a path to an EDM ``.pkl`` (read with the safe loader); or a folder written by
            :func:`save_teacher` (safetensors + config.json).
        device: where the teacher lives.
    """
    if spec in MIXTURE_SPECS:
        opts = dict(MIXTURE_SPECS[spec])
        teacher = MixtureTeacher.preset(opts.pop("preset"), **opts)
    elif Path(spec).is_dir():
        teacher = load_converted(spec)
    elif spec in OFFICIAL_CHECKPOINTS or spec.endswith(".pkl") or Path(spec).is_file():
        teacher = load_edm(spec)
    else:
        raise ValueError(f"load_teacher: {spec!r} is not a mixture preset ({', '.join(MIXTURE_SPECS)}), an official "
                         f"EDM name ({', '.join(OFFICIAL_CHECKPOINTS)}), an existing .pkl file or a "
                         f"converted teacher folder")
    return teacher.to(device).eval().requires_grad_(False)

