"""EDM's preconditioners (docs/EDM.md): D(x; sigma) = c_skip x + c_out F(c_in x; c_noise, labels).

Each wraps its U-Net as ``model`` (so every state-dict key starts with ``model.``; iDDPM adds the buffer ``u``) and
satisfies :class:`get.teachers.Teacher`: ``resolution``, ``channels``, ``label_dim``, ``sigma_min``, ``sigma_max``,
``round_sigma``, ``bottleneck`` and ``identity``. ``config`` holds the class name and the constructor keywords, which
rebuild the network exactly (``PRECONDITIONERS[config['class_name']](**config['kwargs'])``).
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from torch import nn

from get.edm.networks import NETWORKS
from get.io import tensors_sha256

__all__ = ["EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond", "PRECONDITIONERS"]


class _Precond(nn.Module):
    """Shared forward pass; subclasses give the coefficients (c_skip, c_out, c_in, c_noise) of sigma."""

    out_channel_factor = 1

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 model_type: str = "DhariwalUNet", name: str | None = None, **model_kwargs):
        super().__init__()
        if model_type not in NETWORKS:
            raise ValueError(f"{type(self).__name__}: model_type={model_type!r} is not supported; "
                             f"choose from {sorted(NETWORKS)}")
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16 = bool(use_fp16)
        self.name = name or type(self).__name__
        self.model = NETWORKS[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                          out_channels=img_channels * self.out_channel_factor, label_dim=label_dim,
                                          **model_kwargs)

    def _record_config(self, init_locals: dict[str, Any]) -> None:
        """``config``: class name and the constructor keywords (own signature plus the network's)."""
        names = [n for n in inspect.signature(type(self).__init__).parameters
                 if n not in ("self", "name", "model_kwargs")]
        kwargs = {n: init_locals[n] for n in names}
        kwargs.update(init_locals["model_kwargs"])
        self.config = {"class_name": type(self).__name__, "kwargs": kwargs}

    # Teacher protocol attributes.
    @property
    def resolution(self) -> int:
        return self.img_resolution

    @property
    def channels(self) -> int:
        return self.img_channels

    def round_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(sigma)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _inputs(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None,
                force_fp32: bool):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)  # (B or 1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            if not class_labels.is_floating_point() and class_labels.ndim == 1:  # class indices (B,) -> one-hot
                class_labels = torch.nn.functional.one_hot(class_labels.long(), self.label_dim)
            if class_labels.shape[-1] != self.label_dim or class_labels.numel() // self.label_dim not in (1, len(x)):
                raise ValueError(f"{type(self).__name__}: class_labels must be one-hot (B, {self.label_dim}) or int64 "
                                 f"(B,), got {class_labels.dtype} {tuple(class_labels.shape)} for B = {len(x)}")
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == "cuda") else torch.float32
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        return x, class_labels, dtype, c_skip, c_out, c_in, c_noise

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                force_fp32: bool = False, **model_kwargs) -> torch.Tensor:
        """D(x; sigma) (B, C, R, R) float32; class_labels one-hot (B, label_dim) or int64 indices (B,) (None: a zero
        row, as EDM)."""
        x, class_labels, dtype, c_skip, c_out, c_in, c_noise = self._inputs(x, sigma, class_labels, force_fp32)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        # Under autocast the network may return the autocast dtype; the output is cast to float32 below anyway.
        if F_x.dtype != dtype and not torch.is_autocast_enabled(F_x.device.type):
            raise RuntimeError(f"{type(self).__name__}: network returned {F_x.dtype}, expected {dtype}")
        return c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)

    def bottleneck(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                   force_fp32: bool = False) -> torch.Tensor:
        """Output of the last encoder module (e.g. 768 x 8 x 8 for ImageNet ADM, 256 x 8 x 8 for CIFAR DDPM++) for
        the preconditioned input c_in x at c_noise, as DMD2's ``return_bottleneck``; float32, differentiable."""
        x, class_labels, dtype, _, _, c_in, c_noise = self._inputs(x, sigma, class_labels, force_fp32)
        emb = self.model.embed(c_noise.flatten(), class_labels)
        return self.model.encode((c_in * x).to(dtype), emb)[-1].to(torch.float32)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": tensors_sha256(self.state_dict()), "config": self.config}


class EDMPrecond(_Precond):
    """EDM preconditioning (Karras et al. 2022, Table 1); used by every config-F checkpoint."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0, sigma_max: float = float("inf"), sigma_data: float = 0.5,
                 model_type: str = "DhariwalUNet", name: str | None = None, **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, name, **model_kwargs)
        self.sigma_min, self.sigma_max, self.sigma_data = float(sigma_min), float(sigma_max), float(sigma_data)
        self._record_config(locals())

    def coefficients(self, sigma):
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sd2 + sigma ** 2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4


class VPPrecond(_Precond):
    """Variance-preserving preconditioning (Song et al. 2021, DDPM++ baselines)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5,
                 model_type: str = "SongUNet", name: str | None = None, **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, name, **model_kwargs)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = float(beta_d), float(beta_min), int(M), float(epsilon_t)
        with torch.device("cpu"):  # float32 scalars as EDM computes them, also when built under torch.device('meta')
            self.sigma_min = float(self.sigma(epsilon_t))
            self.sigma_max = float(self.sigma(1))
        self._record_config(locals())

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma):
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(_Precond):
    """Variance-exploding preconditioning (Song et al. 2021, NCSN++ baselines)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.02, sigma_max: float = 100, model_type: str = "SongUNet",
                 name: str | None = None, **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, name, **model_kwargs)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._record_config(locals())

    def coefficients(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()


class iDDPMPrecond(_Precond):  # noqa: N801  (the official class name)
    """Improved-DDPM preconditioning (Nichol & Dhariwal 2021, ADM baselines): a discrete grid of M+1 noise levels
    ``u`` (persistent buffer), 2 * img_channels network outputs of which the first img_channels are used."""

    out_channel_factor = 2

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 C_1: float = 0.001, C_2: float = 0.008, M: int = 1000, model_type: str = "DhariwalUNet",
                 name: str | None = None, **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, name, **model_kwargs)
        self.C_1, self.C_2, self.M = float(C_1), float(C_2), int(M)
        with torch.device("cpu"):  # float32 arithmetic as the official buffer, also under torch.device('meta')
            u = torch.zeros(self.M + 1)
            alpha_bar = self.alpha_bar(torch.arange(self.M + 1))  # (M+1,)
            for j in range(self.M, 0, -1):
                u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar[j - 1] / alpha_bar[j]).clip(min=self.C_1) - 1).sqrt()
        self.register_buffer("u", u)
        self.sigma_min = float(u[self.M - 1])
        self.sigma_max = float(u[0])
        self._record_config(locals())

    def alpha_bar(self, j: int | torch.Tensor) -> torch.Tensor:
        j = torch.as_tensor(j)
        return (0.5 * np.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma: torch.Tensor | float, return_index: bool = False) -> torch.Tensor:
        """Snap sigma to the nearest u_j (or return j)."""
        sigma = torch.as_tensor(sigma)
        index = torch.cdist(sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1),
                            self.u.reshape(1, -1, 1)).argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)

    def coefficients(self, sigma):
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), c_noise


PRECONDITIONERS: dict[str, type[_Precond]] = {cls.__name__: cls for cls in (EDMPrecond, VPPrecond, VEPrecond,
                                                                              iDDPMPrecond)}
