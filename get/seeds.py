"""The seeds contract: every random input of a sample is a function of its seed, the same in every script.

Syntax. Seed lists use EDM's syntax, comma-separated integers and inclusive ranges (``'0-999,2000'``):
:func:`parse_seeds` reads it, :func:`format_seeds` writes the shortest string for a list.

A seed's inputs. :func:`draw_inputs` draws what a model needs for a list of seeds, each row from its own seed only,
so a sample never depends on the batch it is in, the batch size or the number of ranks:

- latent and label: one ``torch.Generator`` per seed, seeded with ``seed mod 2**32``, draws the latent
  ``randn([C, R, R])`` (float32, unit Gaussian; EDM's sampler multiplies it by sigma_max) and then, for a conditional
  model with the ``'random'`` label policy, the label ``randint(label_dim)``: EDM's ``generate.py`` order, so the pair
  data sets keep EDM's per-seed streams. With the ``'balanced'`` policy the label is ``seed mod label_dim`` (nothing is
  drawn), so any ``label_dim`` consecutive seeds cover every class once.
- sampler noise: the same per-seed generator continues after the latent and label; EDM's stochastic sampler
  (``S_churn > 0``) and multi-step generators draw their per-step noise from it (``SeedInputs.noise``).
- z0 (GET's initial equilibrium state, shape (N, D) per sample): a second per-seed generator seeded with
  ``derived_seed(seed, Z0_STREAM)`` draws ``randn([N, D])``; further GET calls of a multi-step generator continue it
  (``SeedInputs.z0_stream``). A separate stream keeps z0 independent of the label policy and of the sampler's noise.

Generator device. CPU generators (MT19937) and CUDA generators (Philox) give different numbers for one seed. EDM
draws on CUDA, so ``rng_device='cuda'`` reproduces EDM's per-seed latents; the default ``'cpu'`` gives another
(equally valid) stream that does not depend on the machine. The pair manifest records the device the pairs were drawn
with (``get.data.PairSettings.rng_device``), and every reader draws held-out and grid seeds on that device.

Derived seeds. :func:`derived_seed` hashes integers into decorrelated 32-bit seeds (numpy SeedSequence): one per rank
(:func:`rank_seed`), per run and step, or per stream. docs/EDM.md has the details and EDM's own conventions.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "LABEL_POLICIES", "Z0_STREAM", "MAX_SEED", "parse_seeds", "format_seeds", "StackedRandomGenerator", "derived_seed",
    "rank_seed", "seed_all", "InputSpec", "SeedInputs", "draw_inputs",
]

LABEL_POLICIES = ("random", "balanced")
Z0_STREAM = 1  # z0 of seed s comes from the generator seeded with derived_seed(s, Z0_STREAM)

_SEED_ITEM = re.compile(r"(\d+)(?:-(\d+))?", re.ASCII)
MAX_SEED = 2**63 - 1  # seeds are stored as int64 (the pair shards' "seed" tensor)


# ----------------------------------------------------------------------------------------------------------------
# EDM's seed syntax.


def parse_seeds(s: str) -> list[int]:
    """Parses EDM's seed syntax: a comma-separated list of integers and inclusive ranges.

    Args:
        s: e.g. ``'0-999,2000,3000-3010'``.

    Returns:
        The seeds in the order given (duplicates kept, as EDM does).

    Raises:
        ValueError: on an empty item, a negative, malformed or too large (> :data:`MAX_SEED`) number, or a decreasing
            range; the message names the item.
    """
    if not isinstance(s, str) or not s.strip():
        raise ValueError(f"seeds: expected a string like '0-999,2000', got {s!r}")
    seeds: list[int] = []
    for item in s.split(","):
        item = item.strip()
        m = _SEED_ITEM.fullmatch(item)
        if m is None:
            hint = "seeds must be >= 0" if re.fullmatch(r"-\d+(-\d+)?", item) else "expected N or N-M"
            raise ValueError(f"seeds: cannot parse item {item!r} in {s!r} ({hint})")
        lo = int(m.group(1))
        hi = lo if m.group(2) is None else int(m.group(2))
        if hi > MAX_SEED:
            raise ValueError(f"seeds: {hi} in {item!r} exceeds the largest seed 2**63 - 1 = {MAX_SEED} "
                             f"(seeds are stored as int64)")
        if hi < lo:
            raise ValueError(f"seeds: range {item!r} is decreasing")
        seeds.extend(range(lo, hi + 1))
    return seeds


def format_seeds(seeds: Sequence[int]) -> str:
    """The shortest EDM seed string ('0-9,12,20-29') for a seed list, order kept (inverse of :func:`parse_seeds`)."""
    parts, i = [], 0
    seeds = [int(s) for s in seeds]
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ",".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# Generators.


class StackedRandomGenerator:
    """One ``torch.Generator`` per sample; draws are stacked along the batch axis.

    Args:
        device: device of the generators (``'cpu'`` or ``'cuda'``); see the module docstring for what it changes.
        seeds: one integer per sample; seeded with ``seed mod 2**32`` as EDM does.
    """

    def __init__(self, device: torch.device | str, seeds: Sequence[int]):
        self.device = _generator_device(device)
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
        """Like ``torch.randn_like``, one generator per row of ``input``; drawn on the generators' device (which
        decides the numbers) and moved to ``input``'s."""
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout).to(input.device)

    def randint(self, *args, size: Sequence[int], **kwargs) -> torch.Tensor:
        """Like ``torch.randint(*args, size=size)``, one generator per row."""
        self._check_batch(size)
        kwargs.setdefault("device", self.device)
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs) for gen in self.generators])


def _generator_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("these seeds are defined by CUDA generators (rng_device 'cuda', e.g. pairs drawn on a GPU); "
                         "CPU and CUDA generators give different numbers, so draw them on a machine with CUDA")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"generator device must be 'cpu' or 'cuda', got {device}")
    return device


def derived_seed(*keys: int) -> int:
    """A 32-bit seed hashed from non-negative integers (numpy SeedSequence): decorrelated streams from one seed."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def rank_seed(seed: int, rank: int) -> int:
    """The seed of one rank of a run seeded with ``seed``."""
    return derived_seed(seed, rank)


def seed_all(seed: int) -> None:
    """Seeds python, numpy and torch (CPU and every CUDA device) with one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# A model's inputs for a list of seeds.


@dataclass(frozen=True)
class InputSpec:
    """What a model (or teacher) takes as input, per sample.

    Attributes:
        channels, resolution: the latent (and image) shape (C, R, R).
        label_dim: number of classes; 0 = unconditional.
        z0_shape: per-sample shape of the initial equilibrium state (N, D) of a GET; None for models without one.
    """

    channels: int
    resolution: int
    label_dim: int = 0
    z0_shape: tuple[int, ...] | None = None

    @classmethod
    def of(cls, source) -> InputSpec:
        """The spec of a model (its ``input_spec``), of anything with ``channels``, ``resolution`` and ``label_dim``
        (a teacher, a ``PairDataset``), or an InputSpec itself."""
        if isinstance(source, InputSpec):
            return source
        spec = getattr(source, "input_spec", None)
        if isinstance(spec, InputSpec):
            return spec
        try:
            return cls(int(source.channels), int(source.resolution), int(source.label_dim))
        except AttributeError:
            raise TypeError(f"{type(source).__name__} has no input_spec nor channels/resolution/label_dim") from None


@dataclass
class SeedInputs:
    """A model's inputs for a list of seeds (see the module docstring for how each is drawn).

    Attributes:
        seeds: the seeds, one per row.
        latents: (B, C, R, R) float32 unit Gaussian.
        labels: (B,) int64 class indices, or None for an unconditional model.
        z0: (B, N, D) float32 initial equilibrium states of a GET, or None.
        noise: each seed's generator after its latent and label (the sampler's per-step noise).
        z0_stream: each seed's z0 generator after z0 (z0 of further GET calls), or None.
    """

    seeds: list[int]
    latents: torch.Tensor
    labels: torch.Tensor | None
    z0: torch.Tensor | None
    noise: StackedRandomGenerator
    z0_stream: StackedRandomGenerator | None

    def to(self, device: torch.device | str) -> SeedInputs:
        """The tensors on ``device`` (the generators stay where they are)."""
        move = lambda t: None if t is None else t.to(device)
        return SeedInputs(self.seeds, move(self.latents), move(self.labels), move(self.z0), self.noise,
                          self.z0_stream)


def draw_inputs(seeds: Sequence[int], source, *, label_policy: str | None = "random",
                rng_device: torch.device | str = "cpu", device: torch.device | str | None = None) -> SeedInputs:
    """Latents, labels and z0 of a list of seeds, each row a function of its own seed only.

    Args:
        seeds: one integer per sample.
        source: the model or teacher the inputs are for (see :meth:`InputSpec.of`).
        label_policy: ``'random'`` (EDM: drawn after the latent) or ``'balanced'`` (``seed mod label_dim``); ignored
            for unconditional models (None, as an unconditional pair set records it, means ``'random'``).
        rng_device: device of the per-seed generators: it decides the numbers (see the module docstring).
        device: where the returned tensors go (default: ``rng_device``).

    Returns:
        :class:`SeedInputs`.
    """
    label_policy = label_policy or "random"
    if label_policy not in LABEL_POLICIES:
        raise ValueError(f"label_policy must be one of {LABEL_POLICIES}, got {label_policy!r}")
    spec = InputSpec.of(source)
    seeds = [int(s) for s in seeds]
    rnd = StackedRandomGenerator(rng_device, seeds)
    latents = rnd.randn([len(seeds), spec.channels, spec.resolution, spec.resolution])  # (B, C, R, R)
    labels = None
    if spec.label_dim > 0:
        if label_policy == "random":
            labels = rnd.randint(spec.label_dim, size=[len(seeds)])  # (B,)
        else:
            labels = torch.tensor([s % spec.label_dim for s in seeds], dtype=torch.int64, device=rnd.device)
    z0 = z0_stream = None
    if spec.z0_shape is not None:
        z0_stream = StackedRandomGenerator(rng_device, [derived_seed(s, Z0_STREAM) for s in seeds])
        z0 = z0_stream.randn([len(seeds), *spec.z0_shape])  # (B, N, D)
    inputs = SeedInputs(seeds, latents, labels, z0, rnd, z0_stream)
    return inputs.to(device) if device is not None else inputs
