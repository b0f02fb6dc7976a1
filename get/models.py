"""Generative Equilibrium Transformer (GET) and the ViT baseline of Geng, Pokle & Kolter (NeurIPS 2023).

A GET maps unit Gaussian noise (B, C, H, W) to an image in one network call:
patch embedding + fixed sin-cos positions → Injection Transformer (run once) → one additive QKV injection per
equilibrium block → the Equilibrium Transformer f (3 weight-tied blocks) solved for its fixed point z* from a
Gaussian z_0 → LayerNorm + zero-initialised Linear → unpatchify.

Module and parameter names equal the official code's (locuslab/get ``models/get.py``), so official state dicts load
with the identity key map; see :meth:`GET.from_pretrained` for the two documented exceptions it handles (a
``module.`` prefix, and torchdeq weight-norm pairs ``weight_g``/``weight_v`` folded into ``weight``).

Differences from the official forward, on purpose: ``forward`` always returns images from the evaluation solve
(6 fixed-point iterations with lowest-residual selection) and ``trajectory`` returns the 6 gradient-tracked
training states, instead of switching on ``model.training``; z_0 may be given or drawn from a caller's generator.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from safetensors.torch import load_file
from timm.layers import PatchEmbed

import get_kernels
from get.deq import EquilibriumSolver, validate_deq_options
from get.io import read_json, save_safetensors, write_json
from get.seeds import InputSpec

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EMA_WEIGHTS_NAME = "ema.safetensors"
LN_EPS = 1e-6  # every LayerNorm in GET


class NonFiniteError(RuntimeError):
    """A GET forward produced a non-finite state (NaN or inf); the images are not returned."""


#################################################################################
#                                    Helpers                                    #
#################################################################################


def sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed MAE-style 2-D sin-cos table (grid_size², embed_dim), computed in float64.

    For token t = grid_size·i + j (i = row, j = column), Q = embed_dim/4 and ω_m = 10000^(−m/Q): channels
    [0, Q) = sin(j·ω), [Q, 2Q) = cos(j·ω), [2Q, 3Q) = sin(i·ω), [3Q, 4Q) = cos(i·ω). The first half encodes the
    column, as the official table does (its MAE helper calls that half "emb_h").
    """
    if embed_dim % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for the 2-D sin-cos embedding, got {embed_dim}")
    Q = embed_dim // 4
    omega = 1.0 / 10000 ** (np.arange(Q, dtype=np.float64) / Q)  # (Q,)
    i, j = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64), indexing="ij")
    i, j = i.reshape(-1, 1), j.reshape(-1, 1)  # (N, 1) each, row-major tokens
    return np.concatenate([np.sin(j * omega), np.cos(j * omega), np.sin(i * omega), np.cos(i * omega)], axis=1)


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The kernel backend for a device: the one place the model picks its attention/LayerNorm/GELU ops."""
    return get_kernels.default_backend(device) if backend is None else backend


#################################################################################
#                                    Layers                                     #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention whose fused qkv pre-activation can be shifted by injections."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, h, ops, c=None, u=None):
        B, N, D = h.shape
        a = F.linear(h, self.qkv.weight, self.qkv.bias)  # (B, N, 3D)
        if c is not None:
            a = a + c  # class embedding (B, 1, 3D), added before the head split
        if u is not None:
            a = a + u  # injection (B, N, 3D)
        o = ops.attention(a.view(B, N, 3, self.num_heads, D // self.num_heads))  # (B, N, D)
        return self.proj(o)


class Mlp(nn.Module):
    """fc1 → exact (erf) GELU → fc2; the bias add and GELU are one fused op."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, h, ops):
        return self.fc2(ops.bias_gelu(F.linear(h, self.fc1.weight), self.fc1.bias))  # (B, N, D)


class GETBlock(nn.Module):
    """Pre-LN transformer block used for both the Injection and the Equilibrium Transformer (docs/GET.md)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, ops, c=None, u=None):
        h = ops.layer_norm(x, self.norm1.weight, self.norm1.bias, LN_EPS)  # (B, N, D)
        a = self.attn(h, ops, c, u)  # (B, N, D)
        h, x = ops.layer_norm(a, self.norm2.weight, self.norm2.bias, LN_EPS, residual=x)  # x ← x + a; h = LN2(x)
        return x + self.mlp(h, ops)


class LabelEmbedder(nn.Module):
    """Additive class embedding: one (3D,) row per class, shifting q, k and v of every attention block."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes, 3 * dim)

    def forward(self, labels):
        return self.embedding_table(labels).unsqueeze(1)  # (B, 1, 3D)


class FinalLayer(nn.Module):
    """LayerNorm (affine, no adaLN) then Linear D → p²·C."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=LN_EPS)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x, ops):
        return self.linear(ops.layer_norm(x, self.norm_final.weight, self.norm_final.bias, LN_EPS))


#################################################################################
#                                    Models                                     #
#################################################################################


class _PatchTransformer(nn.Module):
    """What GET and the ViT baseline share: embeddings, decoder, input checks, and weight files."""

    def __init__(self, input_size, patch_size, in_channels, hidden_size, num_heads, num_classes, backend):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if backend is not None and backend not in get_kernels.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {get_kernels.BACKENDS} or None (automatic)")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.hidden_size, self.num_heads, self.num_classes = hidden_size, num_heads, num_classes
        self.backend = backend
        self.check_finite = True  # set False for CUDA-graph capture: the checks read device values on the host
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        grid = input_size // patch_size
        # Fixed, but a Parameter as in the official code, so it is saved and counted.
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        # Subclasses register their blocks, then call _init_weights(): the official state-dict order
        # (= AdamW param order) puts final_layer last.

    def _init_weights(self):
        self.final_layer = FinalLayer(self.hidden_size, self.patch_size, self.in_channels)
        # Every Linear: xavier_uniform over the whole (fused) matrix, zero bias (docs/GET.md).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias) if m.bias is not None else None
        grid = self.input_size // self.patch_size
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed(self.hidden_size, grid)).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over the (D, C·p·p) view
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        # Zero output layer: a fresh model returns exactly 0.
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _shared_config(self) -> dict:
        keys = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
                "num_classes", "backend")  # fmt: skip
        return {k: getattr(self, k) for k in keys}

    # ---- input checks ----------------------------------------------------------------------------------------

    def _check_inputs(self, noise, class_labels):
        C, S = self.in_channels, self.input_size
        if not torch.is_tensor(noise) or noise.dim() != 4 or tuple(noise.shape[1:]) != (C, S, S):
            shape = tuple(noise.shape) if torch.is_tensor(noise) else type(noise).__name__
            raise ValueError(f"noise must have shape (B, {C}, {S}, {S}) for this model, got {shape}")
        if not noise.is_floating_point():
            raise ValueError(f"noise must be a floating-point tensor, got {noise.dtype}")
        if self.check_finite and not torch.isfinite(noise).all():
            raise ValueError("noise contains NaN or inf")
        if self.num_classes == 0:
            if class_labels is not None:
                raise ValueError("this model is unconditional (num_classes=0) but class_labels were given")
            return None
        if class_labels is None:
            raise ValueError(f"this model is class-conditional ({self.num_classes} classes): pass class_labels")
        if class_labels.shape != (noise.shape[0],) or class_labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"class_labels must be an integer tensor of shape ({noise.shape[0]},), "
                f"got {class_labels.dtype} {tuple(class_labels.shape)}"
            )
        if self.check_finite and ((class_labels < 0) | (class_labels >= self.num_classes)).any():
            raise ValueError(f"class_labels out of range [0, {self.num_classes})")
        return self.y_embedder(class_labels.long())  # (B, 1, 3D)

    def _check_finite(self, *tensors):
        if self.check_finite and not all(torch.isfinite(t).all() for t in tensors):
            raise NonFiniteError("GET produced a non-finite state (NaN or inf); check the weights and inputs")

    def _ops(self, device):
        return get_kernels.get_ops(resolve_backend(self.backend, device))

    def embed(self, noise):
        return self.x_embedder(noise) + self.pos_embed  # (B, N, D)

    def decode(self, z, ops):
        y = self.final_layer(z, ops)  # (B, N, p·p·C), features ordered (p, q, channel)
        g = self.input_size // self.patch_size
        return rearrange(y, "b (h w) (p q c) -> b c (h p) (w q)", h=g, w=g, p=self.patch_size, q=self.patch_size)

    # ---- weight files ----------------------------------------------------------------------------------------

    def save_pretrained(self, directory, state_dict=None, filename: str = WEIGHTS_NAME) -> Path:
        """Writes ``config.json`` and the weights (``state_dict``, default this model's) as safetensors, atomically.

        Args:
            directory: output folder (created).
            state_dict: weights to write instead of this model's, e.g. an EMA copy with the same keys.
            filename: weights file name; ``ema.safetensors`` for EMA weights beside ``model.safetensors``.
        """
        directory = Path(directory)
        sd = self.state_dict() if state_dict is None else state_dict
        save_safetensors(directory / filename, sd, metadata={"format": "pt", "library": "get"})
        write_json(directory / CONFIG_NAME, {"class": type(self).__name__, **self.config})
        return directory

    @classmethod
    def from_pretrained(cls, path, ema: bool = True, map_location="cpu", **overrides):
        """Loads a model from our files or from an official GET checkpoint.

        Args:
            path: (a) a folder with ``config.json`` and ``model.safetensors`` (and ``ema.safetensors``), or a
                ``.safetensors`` file with ``config.json`` beside it; (b) an official trainer ``.pth`` file
                (``{'args', 'model', 'ema', 'opt'}``), read with ``torch.load(weights_only=True)``.
            ema: load the EMA weights when present (the official evaluation uses them).
            map_location: device for the loaded tensors.
            **overrides: constructor keywords that do not change the weights (e.g. ``backend``, DEQ options).
        """
        path = Path(path)
        if path.suffix in (".pth", ".pt"):
            config, state_dict = _read_official_checkpoint(path, ema, map_location)
        else:
            folder = path if path.is_dir() else path.parent
            config = read_json(folder / CONFIG_NAME)
            if path.is_dir():
                weights = folder / (EMA_WEIGHTS_NAME if ema and (folder / EMA_WEIGHTS_NAME).is_file() else WEIGHTS_NAME)
            else:
                weights = path
            if not weights.is_file():
                raise FileNotFoundError(f"{weights}: weights file not found")
            state_dict = load_file(str(weights), device=str(map_location))
        class_name = config.pop("class", cls.__name__)
        model_cls = {"GET": GET, "ViT": ViT}.get(class_name)
        if model_cls is None:
            raise ValueError(f"{path}: unknown model class {class_name!r} in the config")
        if cls not in (_PatchTransformer, model_cls):
            raise ValueError(f"{path} holds a {class_name}, not a {cls.__name__}")
        model = model_cls(**{**config, **overrides})
        model.load_state_dict(state_dict, strict=True)
        return model.to(map_location)


class GET(_PatchTransformer):
    """Generative Equilibrium Transformer: a one-step noise → image generator solved as a fixed point.

    Args:
        input_size: image height = width, pixels (divisible by patch_size).
        patch_size: patch side, pixels.
        in_channels: image channels (output channels are the same).
        hidden_size: token width D (divisible by num_heads and by 4).
        depth: number L of Injection-Transformer blocks (run once per forward).
        num_heads: attention heads H.
        mlp_ratio: MLP width ratio of the Injection-Transformer blocks.
        deq_depth: number of Equilibrium-Transformer blocks in f (3 in every official config).
        deq_mlp_ratio: MLP width ratio r of the Equilibrium-Transformer blocks.
        num_classes: 0 for unconditional, else the number of classes of the additive class embedding.
        backend: kernel backend 'triton' or 'torch'; None picks triton on CUDA and torch elsewhere.
        deq: DEQ options (see ``get.deq.DEQ_DEFAULTS``; paper values by default).

    Example:
        >>> model = GET_models['GET-XXS/2'](input_size=16).eval()
        >>> images = model(torch.randn(2, 3, 16, 16))                    # (2, 3, 16, 16)
        >>> states = model.trajectory(torch.randn(2, 3, 16, 16))         # 6 x (2, 3, 16, 16), with gradients
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 3,
        hidden_size: int = 768,
        depth: int = 1,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        deq_depth: int = 3,
        deq_mlp_ratio: float = 12.0,
        num_classes: int = 0,
        backend: str | None = None,
        deq: dict | None = None,
    ):
        super().__init__(input_size, patch_size, in_channels, hidden_size, num_heads, num_classes, backend)
        self.depth, self.deq_depth = depth, deq_depth
        self.mlp_ratio, self.deq_mlp_ratio = mlp_ratio, deq_mlp_ratio
        self.deq_options = validate_deq_options(deq)
        self.blocks = nn.ModuleList([GETBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.qkv_inj = nn.Linear(hidden_size, 3 * deq_depth * hidden_size, bias=False)
        self.deq_blocks = nn.ModuleList([GETBlock(hidden_size, num_heads, deq_mlp_ratio) for _ in range(deq_depth)])
        self.solver = EquilibriumSolver(**self.deq_options)
        self._init_weights()

    @property
    def config(self) -> dict:
        """Plain, JSON-able constructor arguments: ``GET(**model.config)`` rebuilds the architecture."""
        return dict(
            **self._shared_config(),
            deq_depth=self.deq_depth,
            deq_mlp_ratio=self.deq_mlp_ratio,
            deq=dict(self.deq_options),
        )

    @property
    def num_states(self) -> int:
        """How many decoded states ``trajectory`` returns (the ``grad`` tracked steps)."""
        return self.deq_options["grad"]

    @property
    def input_spec(self) -> InputSpec:
        """Per-sample inputs: the latent (C, R, R), the classes, and z0 (N, D); ``get.seeds.draw_inputs`` draws them."""
        tokens = (self.input_size // self.patch_size) ** 2
        return InputSpec(self.in_channels, self.input_size, self.num_classes, (tokens, self.hidden_size))

    def _prepare(self, noise, class_labels, z0, generator):
        """Everything before the solve: InjT once, the per-block injections, and z_0."""
        c = self._check_inputs(noise, class_labels)
        ops = self._ops(noise.device)
        x = self.embed(noise)  # (B, N, D)
        for block in self.blocks:
            x = block(x, ops, c)
        u = self.qkv_inj(x).chunk(self.deq_depth, dim=-1)  # deq_depth x (B, N, 3D): one injection per block
        if z0 is None:
            # Drawn after the InjT, as the official randn_like(x), so a seeded global RNG matches it.
            z0 = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)  # (B, N, D)
        elif z0.shape != x.shape:
            raise ValueError(f"z0 must have shape {tuple(x.shape)}, got {tuple(z0.shape)}")

        def f(z):  # the Equilibrium Transformer: z ← g_3(g_2(g_1(z)))
            for block, u_i in zip(self.deq_blocks, u):
                if self.deq_options["mem"] and torch.is_grad_enabled():
                    z = torch.utils.checkpoint.checkpoint(block, z, ops, c, u_i, use_reentrant=False)
                else:
                    z = block(z, ops, c, u_i)
            return z

        return f, z0, ops

    def forward(self, noise, class_labels=None, z0=None, generator=None, return_info=False):
        """One-step generation: ``eval_f_max_iter`` fixed-point iterations, lowest-residual iterate, decode.

        Args:
            noise: (B, C, H, W) unit Gaussian noise (EDM's latent before scaling by sigma_max).
            class_labels: (B,) int64 in [0, num_classes) for a conditional model, else None.
            z0: (B, N, D) initial equilibrium state; default Gaussian from ``generator``.
            generator: torch.Generator for z_0, so a forward pass is reproducible.
            return_info: also return solver statistics (``abs_trace`` (B, K), ``abs_lowest``, ``nstep``, ...).

        Returns:
            images (B, C, H, W), and the info dict when ``return_info``.

        Raises:
            NonFiniteError: when the solve produced NaN or inf.
        """
        f, z0, ops = self._prepare(noise, class_labels, z0, generator)
        z_star, info = self.solver.solve(f, z0)  # (B, N, D)
        images = self.decode(z_star, ops)  # (B, C, H, W)
        # The selection never picks a NaN iterate (NaN < r is False), so check the residuals too.
        self._check_finite(info["abs_trace"], images)
        return (images, info) if return_info else images

    def trajectory(self, noise, class_labels=None, z0=None, generator=None, return_info=False):
        """Training path: the decoded states of the ``grad`` (6) gradient-tracked fixed-point steps.

        Returns:
            list of ``grad`` images (B, C, H, W), first to last, for the fixed-point-correction loss; with
            ``return_info`` also a dict with the step residuals ``abs_trace`` (B, grad).

        Raises:
            NonFiniteError: when a state is NaN or inf.
        """
        f, z0, ops = self._prepare(noise, class_labels, z0, generator)
        states, info = self.solver.trajectory(f, z0)
        images = [self.decode(z, ops) for z in states]
        self._check_finite(info["abs_trace"], images[-1])
        return (images, info) if return_info else images


class ViT(_PatchTransformer):
    """The paper's ViT baseline: the same embeddings and decoder around a plain stack of ``depth`` blocks.

    It is a one-step generator with no equilibrium solve; ``trajectory`` returns a one-element list so the same
    training loop applies. Class conditioning, when asked for, uses GET's additive class embedding (the official
    conditional ViT forward does not run, docs/GET.md). It draws nothing random, so ``forward`` and
    ``trajectory`` refuse a ``z0`` or ``generator`` instead of ignoring it.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 3,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        backend: str | None = None,
    ):
        super().__init__(input_size, patch_size, in_channels, hidden_size, num_heads, num_classes, backend)
        self.depth, self.mlp_ratio = depth, mlp_ratio
        self.blocks = nn.ModuleList([GETBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self._init_weights()

    @property
    def config(self) -> dict:
        return self._shared_config()

    num_states = 1  # trajectory returns the one output

    @property
    def input_spec(self) -> InputSpec:
        """Per-sample inputs: the latent (C, R, R) and the classes; a ViT has no z0."""
        return InputSpec(self.in_channels, self.input_size, self.num_classes)

    def forward(self, noise, class_labels=None, z0=None, generator=None, return_info=False):
        """One-step generation; the signature is GET's so that callers treat both alike.

        A ViT has no equilibrium state and draws nothing random: ``z0`` and ``generator`` must be None (what
        ``get.seeds.draw_inputs`` gives for a ViT); anything else is refused rather than ignored.

        Returns:
            images (B, C, H, W), and an empty info dict when ``return_info``.
        """
        if z0 is not None or generator is not None:
            raise ValueError("ViT has no initial state z0 and draws nothing random: pass z0=None and generator=None")
        c = self._check_inputs(noise, class_labels)
        ops = self._ops(noise.device)
        x = self.embed(noise)  # (B, N, D)
        for block in self.blocks:
            x = block(x, ops, c)
        images = self.decode(x, ops)
        self._check_finite(images)
        return (images, {}) if return_info else images

    def trajectory(self, noise, class_labels=None, z0=None, generator=None, return_info=False):
        """The training path: a one-element list with the forward's images (and its info)."""
        out = self.forward(noise, class_labels, z0, generator, return_info=return_info)
        return ([out[0]], out[1]) if return_info else [out]


#################################################################################
#                           Official checkpoints                                #
#################################################################################


def _fold_weight_norm(state_dict: dict) -> dict:
    """torchdeq weight norm stores weight = g · v / ‖v‖ (norm over all dims but 0) as ``weight_g``/``weight_v``."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(".weight_g"):
            continue
        if key.endswith(".weight_v"):
            stem = key[: -len(".weight_v")]
            g = state_dict[stem + ".weight_g"]
            v = value
            norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
            out[stem + ".weight"] = g.view_as(norm) * v / norm
        else:
            out[key] = value
    return out


def config_from_official_state_dict(state_dict: dict, args: dict | None = None) -> dict:
    """Infers GET constructor arguments from an official state dict (docs/GET.md), using ``args`` when present."""
    args = args or {}
    try:
        pos = state_dict["pos_embed"]
        patch_w = state_dict["x_embedder.proj.weight"]
        fc1 = state_dict["deq_blocks.0.mlp.fc1.weight"]
        inj_fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    except KeyError as e:
        raise KeyError(f"not a GET state dict: missing key {e.args[0]!r}") from None
    D, patch_size, in_channels = pos.shape[2], patch_w.shape[2], patch_w.shape[1]
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    deq_depth = len({k.split(".")[1] for k in state_dict if k.startswith("deq_blocks.")})
    table = state_dict.get("y_embedder.embedding_table.weight")
    grid = math.isqrt(pos.shape[1])
    return dict(
        input_size=int(args.get("input_size", grid * patch_size)),
        patch_size=patch_size,
        in_channels=in_channels,
        hidden_size=D,
        depth=depth,
        num_heads=D // 64,  # not recoverable from shapes; 64 for every official config
        mlp_ratio=(inj_fc1.shape[0] / D) if inj_fc1 is not None else 4.0,
        deq_depth=deq_depth,
        deq_mlp_ratio=fc1.shape[0] / D,
        num_classes=0 if table is None else table.shape[0],
    )


def _read_official_checkpoint(path: Path, ema: bool, map_location):
    """Reads an official trainer .pth safely: weights_only, with argparse.Namespace as the only allowed class."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not readable as an official GET checkpoint with weights_only=True ({e})") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    key = "ema" if ema and "ema" in ckpt else "model"
    if key not in ckpt:
        raise KeyError(f"{path}: no 'model' or 'ema' entry (keys: {sorted(ckpt)})")
    state_dict = {k.removeprefix("module."): v for k, v in ckpt[key].items()}
    state_dict = _fold_weight_norm(state_dict)
    args = ckpt.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    return config_from_official_state_dict(state_dict, args), state_dict


#################################################################################
#                                   Configs                                     #
#################################################################################


def _get(hidden_size, num_heads, depth, deq_mlp_ratio):
    def make(**kwargs):
        return GET(**{**dict(hidden_size=hidden_size, num_heads=num_heads, depth=depth,
                             deq_mlp_ratio=deq_mlp_ratio), **kwargs})  # fmt: skip
    return make


def _vit(hidden_size, num_heads, depth):
    def make(**kwargs):
        return ViT(**{**dict(hidden_size=hidden_size, num_heads=num_heads, depth=depth), **kwargs})
    return make


# Official names (locuslab/get GET_models; suffixes there are InjT depth, EqT depth, EqT MLP ratio), the paper's
# ViT baselines, and small configs for tests and CPU demos. Keyword arguments override, e.g. num_classes=10.
GET_models = {
    "GET-T/2": _get(256, 4, 6, 6),
    "GET-M/2": _get(384, 6, 6, 6),
    "GET-S/2": _get(512, 8, 6, 8),
    "GET-B/2": _get(768, 12, 1, 12),
    "GET-B/2+": _get(768, 12, 6, 8),
    "ViT-B/2": _vit(768, 12, 12),
    "ViT-L/2": _vit(1024, 16, 24),
    "GET-XS/2": _get(128, 2, 2, 4),
    "GET-XXS/2": _get(64, 2, 1, 2),
}


def create_model(name: str, **kwargs) -> GET | ViT:
    """Builds a registered config by name; a clear error lists the names when it is unknown."""
    if name not in GET_models:
        raise KeyError(f"unknown model config {name!r}; choose one of {list(GET_models)}")
    return GET_models[name](**kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameter count; the official totals include the frozen pos_embed."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["GET", "ViT", "GET_models", "NonFiniteError", "create_model", "count_parameters", "sincos_pos_embed"]
