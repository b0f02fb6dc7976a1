"""Images as people see them: EDM's uint8 quantisation, PNG files and grids (samples, pairs)."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from get.io import atomic_write_bytes


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """EDM's quantisation of images in [-1, 1]: round(x·127.5 + 127.5) clipped to [0, 255], as uint8."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def save_png(image_u8: np.ndarray, path: str | os.PathLike) -> Path:
    """Writes one (H, W, C) uint8 image, C = 1 or 3, as a PNG (atomically)."""
    buf = io.BytesIO()
    Image.fromarray(image_u8[..., 0] if image_u8.shape[-1] == 1 else image_u8).save(buf, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Tiles (N, C, H, W) images in [-1, 1] into one PNG, nrow per row (default: a square-ish grid).

    Args:
        images: (N, C, H, W) with C = 1 or 3.
        path: the PNG to write (atomically).
        nrow: images per row.
    """
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"save_image_grid needs 1 or 3 channels, got shape {tuple(images.shape)}")
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = torch.zeros(ncol * h, nrow * w, c, dtype=torch.uint8)
    for i, img in enumerate(to_uint8(images.detach().float().cpu()).permute(0, 2, 3, 1)):  # (H, W, C) each
        r, q = divmod(i, nrow)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    array = grid.numpy()
    pil = Image.fromarray(array[..., 0] if c == 1 else array, "L" if c == 1 else "RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def pair_grid(noise: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Interleaves pairs as noise, image, noise, image, ... for :func:`save_image_grid` with an even ``nrow``,
    so each pair shows as (noise | image) side by side. Images in [-1, 1]; the noise (unit Gaussian) is scaled by 1/3
    so that +-3 sigma spans the displayed range.

    Returns:
        (2N, C, R, R).
    """
    tiles = torch.stack([noise.float() / 3, image.float()], dim=1)  # (N, 2, C, R, R)
    return tiles.flatten(0, 1)  # (2N, C, R, R)
