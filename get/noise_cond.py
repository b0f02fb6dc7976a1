"""Noise-level conditioning for GET (``GET(..., noise_cond=True)``), used by multi-step distillation (Moment Matching).

GET conditions by additive shifts of the fused qkv pre-activations: the class embedding ``c`` (B, 1, 3D) is added to
q, k and v of every Injection- and Equilibrium-Transformer block. The noise level enters the same way, as in EDM:
c_noise = ln(sigma)/4 -> EDM's sinusoidal embedding (``get.edm.layers.PositionalEmbedding``, as EDM's ADM network
embeds c_noise) -> Linear -> SiLU -> Linear to a (B, 1, 3D) shift that is added to ``c``. The last Linear starts at
zero, so a noise-conditioned GET computes exactly what the same weights compute without the embedder; this is what
lets an unconditioned (e.g. offline-distilled or official) GET checkpoint start a noise-conditioned one.
"""

from __future__ import annotations

import torch
from torch import nn

from get.edm.layers import PositionalEmbedding

__all__ = ["NOISE_FREQUENCY_CHANNELS", "NoiseEmbedder", "c_noise", "as_sigma"]

NOISE_FREQUENCY_CHANNELS = 256  # sinusoidal features of c_noise (DiT's frequency_embedding_size)


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """EDM's noise input c_noise = ln(sigma) / 4 (Karras et al. 2022, Table 1), same shape as sigma."""
    return sigma.log() / 4


def as_sigma(sigma, batch: int, device: torch.device, dtype: torch.dtype, where: str, check_values: bool = True
             ) -> torch.Tensor:
    """``sigma`` (a number, a 0-d or a (B,) tensor, EDM units = noise standard deviation) as a (B,) tensor.

    Args:
        sigma: the noise level(s); must be finite and > 0 (c_noise takes its logarithm).
        batch: B.
        device, dtype: of the result.
        where: the caller, for the error messages.
        check_values: read the values on the host to check them (off under CUDA-graph capture).

    Raises:
        ValueError: naming ``sigma`` and its shape or values.
    """
    if not (torch.is_tensor(sigma) or isinstance(sigma, (int, float))) or isinstance(sigma, bool):
        raise ValueError(f"{where}: sigma must be a number or a tensor of shape () or ({batch},), "
                         f"got {type(sigma).__name__}")
    sigma = torch.as_tensor(sigma, device=device)
    if sigma.shape not in ((), (batch,)):
        raise ValueError(f"{where}: sigma must have shape () or ({batch},), got {tuple(sigma.shape)}")
    if sigma.is_complex() or not (sigma.is_floating_point() or sigma.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{where}: sigma must be real, got {sigma.dtype}")
    sigma = sigma.to(dtype).expand(batch)  # (B,)
    if check_values and not bool((torch.isfinite(sigma) & (sigma > 0)).all()):
        raise ValueError(f"{where}: sigma must be finite and > 0, got {sigma.tolist()[:8]}")
    return sigma


class NoiseEmbedder(nn.Module):
    """sigma (B,) -> additive qkv shift (B, 1, 3D): c_noise -> sinusoidal features -> Linear -> SiLU -> Linear.

    Args:
        dim: token width D of the GET.
        frequency_channels: number of sinusoidal features of c_noise.

    The first Linear is xavier-uniform with zero bias (GET's Linear init); the second is all zero, so the shift is
    exactly 0 until training moves it.
    """

    def __init__(self, dim: int, frequency_channels: int = NOISE_FREQUENCY_CHANNELS):
        super().__init__()
        self.frequencies = PositionalEmbedding(frequency_channels)
        self.mlp = nn.Sequential(nn.Linear(frequency_channels, dim), nn.SiLU(), nn.Linear(dim, 3 * dim))
        nn.init.xavier_uniform_(self.mlp[0].weight)
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        features = self.frequencies(c_noise(sigma))  # (B, F)
        return self.mlp(features.to(self.mlp[0].weight.dtype)).unsqueeze(1)  # (B, 1, 3D)
