"""Teachers: the protocol every teacher satisfies, the converted-teacher format, and ``load_teacher``.

A teacher is EDM's denoiser D(x; sigma, class_labels) plus a few attributes (see :class:`Teacher`). Two kinds exist:
the EDM networks (``get.edm``: EDMPrecond / VPPrecond / VEPrecond / iDDPMPrecond, read safely from the official
pickles) and the analytic Gaussian mixture (``get.mixture.MixtureTeacher``). Either kind converts to our own format,
a folder with ``model.safetensors`` and ``config.json`` (:func:`save_teacher`, :func:`load_converted`), that loads
without any pickle. docs/EDM.md describes the formats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file

from get.edm.checkpoint import OFFICIAL_CHECKPOINTS, build_network, load_edm, load_state_dict_strict
from get.edm.precond import PRECONDITIONERS
from get.io import json_sha256, read_json, save_safetensors, tensors_sha256, write_json
from get.mixture import MIXTURE_SPECS, MixtureTeacher
from get.safety import check_int

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
_VERSION = 2  # 2: config.json carries config_sha256


def _config_sha256(config: dict) -> str:
    """sha256 of the canonical JSON of config.json without its own ``config_sha256`` field."""
    body = {k: v for k, v in config.items() if k != "config_sha256"}
    return json_sha256(body)


def save_teacher(teacher, directory: str | Path) -> Path:
    """Writes ``model.safetensors`` (the state dict) and ``config.json`` (class, constructor keywords, name, hashes
    of the weights and of the config itself) into ``directory`` atomically; ``load_teacher(directory)`` rebuilds the
    teacher without any pickle."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    identity = teacher.identity()
    config = {"format": _FORMAT, "version": _VERSION, "name": identity["name"], **identity["config"],
              "sha256": identity["sha256"], "source": getattr(teacher, "source", None)}
    config["config_sha256"] = _config_sha256(config)
    save_safetensors(directory / "model.safetensors", teacher.state_dict())
    write_json(directory / "config.json", config)
    return directory


# Mixture sizes beyond the tensor shapes: max_frequency sets the work per stored element.
_MIXTURE_INT_BOUNDS = {"resolution": (1, 1024), "channels": (1, 64), "num_components": (1, 10_000),
                       "rank": (0, 1024), "max_frequency": (0, 8)}


def _check_mixture(kwargs: dict, tensors: dict[str, torch.Tensor], where: str) -> None:
    """A mixture's sizes must be bounded and agree with its stored tensors before it is built (building computes
    every parameter from the seed, at a cost that grows with the sizes)."""
    for key, bounds in _MIXTURE_INT_BOUNDS.items():
        check_int(kwargs.get(key), key, *bounds, where)
    K, C, R, r = (kwargs[k] for k in ("num_components", "channels", "resolution", "rank"))
    expected = {"means": (K, C * R * R), "factors": (K, C * R * R, r), "diag": (K, C * R * R), "log_weights": (K,),
                "class_of": (K,)}
    for key, shape in expected.items():
        got = tuple(tensors[key].shape) if key in tensors else None
        if got != shape:
            raise ValueError(f"{where}: config (num_components={K}, channels={C}, resolution={R}, rank={r}) needs "
                             f"{key} of shape {shape}, the weights have {got}")


def load_converted(directory: str | Path):
    """Reads a folder written by :func:`save_teacher`, verifying the sha256 of the config and of the weights, and
    checking the config's sizes against the weights' shapes before building anything."""
    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{directory}: a converted teacher needs config.json and model.safetensors")
    config = read_json(config_path)
    if not isinstance(config, dict) or config.get("format") != _FORMAT:
        got = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{config_path}: format is {got!r}, expected {_FORMAT!r}")
    if config.get("version") != _VERSION:
        raise ValueError(f"{config_path}: version {config.get('version')!r}, expected {_VERSION} (convert the .pkl "
                         f"again with save_teacher)")
    if config.get("config_sha256") != _config_sha256(config):
        raise ValueError(f"{config_path}: config_sha256 does not match the config (edited or corrupted file)")
    classes = {**PRECONDITIONERS, "MixtureTeacher": MixtureTeacher}
    if config.get("class_name") not in classes:
        raise ValueError(f"{config_path}: unknown class_name {config.get('class_name')!r}; known: {sorted(classes)}")
    kwargs, name = config.get("kwargs"), config.get("name")
    if not isinstance(kwargs, dict) or not isinstance(name, str):
        raise ValueError(f"{config_path}: kwargs must be a dict and name a string")
    tensors = load_file(str(weights_path))
    if tensors_sha256(tensors) != config.get("sha256"):
        raise ValueError(f"{weights_path}: sha256 of the weights does not match config.json (corrupted file?)")
    if config["class_name"] in PRECONDITIONERS:
        teacher = build_network(config["class_name"], kwargs, str(config_path), name)
    else:
        _check_mixture(kwargs, tensors, str(config_path))
        teacher = MixtureTeacher(**{**kwargs, "name": name})
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

