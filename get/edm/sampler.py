"""EDM's Heun sampler (Karras et al. 2022, Algorithm 2) and per-sample seeding.

Seeds. Every sample owns a seed and one ``torch.Generator`` seeded with ``seed mod 2**32``; its latent, its class label
and the sampler's per-step noise are drawn from that generator only, in EDM's order (latent ``randn([C, H, W])``
float32, then ``randint(label_dim)`` if conditional, then one float64 ``randn_like`` per sampler step). A sample
therefore depends only on its seed, never on the batch it is in, the batch size or the number of ranks.

Relation to EDM's seeds. EDM's ``generate.py`` creates its generators on the CUDA device (Philox); on a CPU device
PyTorch uses MT19937. The same seed gives different numbers on the two, so our CPU-generated seed ``s`` is not EDM's
seed ``s``. Passing ``device='cuda'`` to :class:`StackedRandomGenerator` / :func:`seed_inputs` reproduces EDM's
per-seed draws (same draw order; bitwise equality across PyTorch versions is not guaranteed by PyTorch). The device of
the generator, not the device of the network, decides the stream: record it with the pairs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "parse_seeds",
    "StackedRandomGenerator",
    "seed_inputs",
    "edm_time_steps",
    "edm_sampler",
]

_SEED_RANGE = re.compile(r"^(\d+)-(\d+)$")


def parse_seeds(s: str) -> list[int]:
    """Parses EDM's seed syntax: a comma-separated list of integers and inclusive ranges.

    Args:
        s: e.g. ``'0-999,2000,3000-3010'``.

    Returns:
        The seeds in the order given (duplicates kept, as EDM does).

    Raises:
        ValueError: on an empty item, a negative or malformed number, or a decreasing range.
    """
    if not isinstance(s, str) or not s.strip():
        raise ValueError(f"seeds: expected a string like '0-999,2000', got {s!r}")
    seeds: list[int] = []
    for item in s.split(","):
        item = item.strip()
        m = _SEED_RANGE.match(item)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f"seeds: range {item!r} is decreasing")
            seeds.extend(range(lo, hi + 1))
        elif item.isdigit():
            seeds.append(int(item))
        else:
            raise ValueError(f"seeds: cannot parse item {item!r} in {s!r} (expected N or N-M with N, M >= 0)")
    return seeds


class StackedRandomGenerator:
    """One ``torch.Generator`` per sample; draws are stacked along the batch axis.

    Args:
        device: device of the generators (``'cpu'`` or ``'cuda'``); see the module docstring for what it changes.
        seeds: one integer per sample; seeded with ``seed mod 2**32`` as EDM does.
    """

    def __init__(self, device: torch.device | str, seeds: Sequence[int]):
        self.device = torch.device(device)
        self.seeds = [int(seed) for seed in seeds]
        self.generators = [torch.Generator(self.device).manual_seed(seed % (1 << 32)) for seed in self.seeds]

    def _check_batch(self, size: Sequence[int]) -> None:
        if len(size) == 0 or size[0] != len(self.generators):
            raise ValueError(f"StackedRandomGenerator: size {tuple(size)} must start with the number of seeds "
                             f"({len(self.generators)})")

    def randn(self, size: Sequence[int], **kwargs) -> torch.Tensor:
        """Standard normal draws of ``size`` = (B, ...); row b comes from generator b."""
        self._check_batch(size)
        kwargs.setdefault("device", self.device)
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, input: torch.Tensor) -> torch.Tensor:
        """Like ``torch.randn_like``, one generator per row of ``input``."""
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size: Sequence[int], **kwargs) -> torch.Tensor:
        """Like ``torch.randint(*args, size=size)``, one generator per row."""
        self._check_batch(size)
        kwargs.setdefault("device", self.device)
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs) for gen in self.generators])


def seed_inputs(seeds: Sequence[int], teacher, device: torch.device | str = "cpu",
                label_policy: str = "random") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Latents and class labels of a list of seeds, each a function of its own seed only.

    Args:
        seeds: one integer per sample.
        teacher: anything with ``channels``, ``resolution`` and ``label_dim`` (a :class:`get.teachers.Teacher`).
        device: device of the per-seed generators (and of the returned tensors).
        label_policy: ``'random'``: the label is ``randint(label_dim)`` drawn right after the latent from the
            seed's generator (EDM's ``generate.py``); ``'balanced'``: ``seed mod label_dim``, so any run of
            ``label_dim`` consecutive seeds covers every class once. Ignored for unconditional teachers.

    Returns:
        ``latents`` (B, C, R, R) float32 unit Gaussian (EDM multiplies them by sigma_max in the sampler) and
        ``labels`` (B,) int64 class indices, or ``None`` when ``teacher.label_dim == 0``.
    """
    if label_policy not in ("random", "balanced"):
        raise ValueError(f"label_policy must be 'random' or 'balanced', got {label_policy!r}")
    rnd = StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(rnd.seeds), teacher.channels, teacher.resolution, teacher.resolution])  # (B, C, R, R)
    if teacher.label_dim == 0:
        return latents, None
    if label_policy == "random":
        labels = rnd.randint(teacher.label_dim, size=[len(rnd.seeds)])  # (B,)
    else:
        labels = torch.tensor([seed % teacher.label_dim for seed in rnd.seeds], dtype=torch.int64, device=rnd.device)
    return latents, labels


def edm_time_steps(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                   round_sigma: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Karras et al. time steps t_0 = sigma_max > ... > t_{N-1} = sigma_min, then t_N = 0 (float64, shape (N+1,))."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=device)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1)
               * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    if round_sigma is not None:
        t_steps = torch.as_tensor(round_sigma(t_steps), dtype=torch.float64, device=device)
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])


def _as_one_hot(class_labels: torch.Tensor | None, label_dim: int) -> torch.Tensor | None:
    """Integer labels (B,) become one-hot rows (B, label_dim); float rows pass through."""
    if class_labels is None or label_dim == 0:
        return None
    if class_labels.dtype in (torch.int32, torch.int64) and class_labels.ndim == 1:
        if class_labels.numel() and (int(class_labels.min()) < 0 or int(class_labels.max()) >= label_dim):
            raise ValueError(f"class_labels must lie in [0, {label_dim}), got min {int(class_labels.min())} "
                             f"max {int(class_labels.max())}")
        return F.one_hot(class_labels, label_dim).to(torch.float32)
    return class_labels


@torch.no_grad()
def edm_sampler(net, latents: torch.Tensor, class_labels: torch.Tensor | None = None,
                randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like, num_steps: int = 18,
                sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, S_churn: float = 0.0,
                S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0) -> torch.Tensor:
    """EDM's Heun sampler (deterministic for ``S_churn = 0``), float64 state, 2N-1 denoiser evaluations.

    Args:
        net: a teacher: ``net(x, sigma, class_labels) -> D(x; sigma)``, with ``sigma_min``, ``sigma_max``,
            ``round_sigma`` and ``label_dim``.
        latents: (B, C, R, R) unit Gaussian; the start is ``latents * t_0`` with t_0 = sigma_max.
        class_labels: one-hot (B, label_dim) as EDM passes them, or int64 class indices (B,); None if unconditional.
        randn_like: noise source for the churn; pass ``StackedRandomGenerator.randn_like`` for per-seed noise.
            It is called at every step even when the churn is zero (as in EDM), so per-seed streams stay aligned.
        num_steps: N; sigma_min, sigma_max, rho: the Karras schedule (sigma_min/max clipped to the net's range).
        S_churn, S_min, S_max, S_noise: stochasticity (EDM Algorithm 2).

    Returns:
        (B, C, R, R) float64 images, unclipped.
    """
    sigma_min = max(sigma_min, float(net.sigma_min))
    sigma_max = min(sigma_max, float(net.sigma_max))
    class_labels = _as_one_hot(class_labels, int(getattr(net, "label_dim", 0)))
    t_steps = edm_time_steps(num_steps, sigma_min, sigma_max, rho, net.round_sigma, latents.device)  # (N+1,)

    x_next = latents.to(torch.float64) * t_steps[0]  # (B, C, R, R)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # Increase the noise temporarily.
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = torch.as_tensor(net.round_sigma(t_cur + gamma * t_cur), dtype=torch.float64, device=latents.device)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)

        # Euler step.
        denoised = net(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Apply 2nd order correction.
        if i < num_steps - 1:
            denoised = net(x_next, t_next, class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next
