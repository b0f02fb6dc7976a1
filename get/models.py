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
import inspect
import logging
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
from get.noise_cond import NoiseEmbedder, as_sigma
from get.safety import check_int, check_number, check_torch_zip, tensor_layout_error, total_bytes_error
from get.seeds import InputSpec

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EMA_WEIGHTS_NAME = "ema.safetensors"
LN_EPS = 1e-6  # every LayerNorm in GET
logger = logging.getLogger(__name__)


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
        where = type(self).__name__
        for name, value in (("input_size", input_size), ("patch_size", patch_size), ("in_channels", in_channels),
                            ("hidden_size", hidden_size), ("num_heads", num_heads)):
            check_int(value, name, 1, math.inf, where)
        if hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f"{where}: hidden_size {hidden_size} must be divisible by num_heads {num_heads} and by 4 "
                             f"(the sin-cos positions)")
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
        dtype = self.pos_embed.dtype
        if noise.dtype != dtype:  # refused, not cast: a float64 caller would silently get float32 precision
            raise ValueError(f"noise must be {dtype} like the model's weights, got {noise.dtype}; cast it "
                             f"(noise.to({dtype})) or the model (model.to(dtype))")
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

    @staticmethod
    def _finite_samples(noise):
        """(B, 1, 1, 1) whether each sample's noise is finite: outputs are ``torch.where(ok, images, nan)``, so that
        without the input checks (check_finite=False) a NaN/inf sample never decodes to a finite image (e.g. z_0's).
        On device, no host sync."""
        return torch.isfinite(noise).flatten(1).all(1).view(-1, 1, 1, 1)

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
            **overrides: constructor keywords that do not change the weights (e.g. ``backend``, DEQ options,
                ``num_heads`` for an official file without ``args.model`` whose D is not a multiple of 64), or
                ``noise_cond=True`` on a file without a noise embedder: the embedder's keys are then the only ones
                allowed to be missing; they keep their initial values (zero last layer: the outputs are unchanged).

        Returns:
            The model. Its ``new_keys`` attribute lists the state-dict keys that were not in the file (empty unless
            ``noise_cond=True`` added a noise embedder); they are also logged at INFO level.

        Raises:
            ValueError / KeyError: naming the file and key, when the file is malformed or its config (``args`` of an
                official file, ``config.json`` of ours) disagrees with the tensor shapes; checked before building.
        """
        path = Path(path)
        if not path.exists():  # else a missing file would be reported as its folder's missing config.json
            raise FileNotFoundError(f"{path}: no such model folder or file")
        if path.suffix in (".pth", ".pt"):
            config, state_dict = _read_official_checkpoint(path, ema, map_location, overrides.get("num_heads"))
            where = str(path)
        else:
            folder = path if path.is_dir() else path.parent
            config = read_json(folder / CONFIG_NAME)
            if not isinstance(config, dict):
                raise ValueError(f"{folder / CONFIG_NAME}: expected a JSON object, got {type(config).__name__}")
            if path.is_dir():
                weights = folder / (EMA_WEIGHTS_NAME if ema and (folder / EMA_WEIGHTS_NAME).is_file() else WEIGHTS_NAME)
            else:
                weights = path
            if not weights.is_file():
                raise FileNotFoundError(f"{weights}: weights file not found")
            state_dict = load_file(str(weights), device=str(map_location))
            where = f"{folder / CONFIG_NAME} and {weights.name}"
        class_name = config.pop("class", cls.__name__)
        model_cls = {"GET": GET, "ViT": ViT}.get(class_name)
        if model_cls is None:
            raise ValueError(f"{path}: unknown model class {class_name!r} in the config")
        if cls not in (_PatchTransformer, model_cls):
            raise ValueError(f"{path} holds a {class_name}, not a {cls.__name__}")
        add_noise_embedder = overrides.get("noise_cond") is True and not config.get("noise_cond", False)
        config = {**config, **overrides}
        _check_config(model_cls, config, state_dict, where)  # before building: sizes bounded and equal to the file's
        model = model_cls(**config)
        model.new_keys = _load_state_dict(model, state_dict, add_noise_embedder, where)
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
        noise_cond: add a noise-level input ``sigma`` (EDM units) to ``forward`` and ``trajectory``: its embedding
            (``get.noise_cond.NoiseEmbedder``) is added to the class embedding in every block's qkv. Its last layer
            starts at zero, so the outputs equal those of the same weights without it until it is trained.

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
        noise_cond: bool = False,
    ):
        if not isinstance(noise_cond, bool):
            raise ValueError(f"noise_cond must be True or False, got {noise_cond!r}")
        super().__init__(input_size, patch_size, in_channels, hidden_size, num_heads, num_classes, backend)
        self.depth, self.deq_depth = depth, deq_depth
        self.mlp_ratio, self.deq_mlp_ratio = mlp_ratio, deq_mlp_ratio
        self.deq_options = validate_deq_options(deq)
        self.blocks = nn.ModuleList([GETBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.qkv_inj = nn.Linear(hidden_size, 3 * deq_depth * hidden_size, bias=False)
        self.deq_blocks = nn.ModuleList([GETBlock(hidden_size, num_heads, deq_mlp_ratio) for _ in range(deq_depth)])
        self.solver = EquilibriumSolver(**self.deq_options)
        self._init_weights()
        self.noise_cond = noise_cond
        # Built after _init_weights: the other weights draw the same random numbers as without it (same seed, same
        # weights), and its keys come after the official ones.
        self.noise_embedder = NoiseEmbedder(hidden_size) if noise_cond else None

    @property
    def config(self) -> dict:
        """Plain, JSON-able constructor arguments: ``GET(**model.config)`` rebuilds the architecture."""
        return dict(
            **self._shared_config(),
            deq_depth=self.deq_depth,
            deq_mlp_ratio=self.deq_mlp_ratio,
            deq=dict(self.deq_options),
            noise_cond=self.noise_cond,
        )

    def set_deq_options(self, **changes) -> None:
        """Changes DEQ options in place (validated as at construction; saved with the config), e.g.
        ``model.set_deq_options(eval_select="last")`` for a generator distilled on ``trajectory()[-1]``."""
        self.deq_options = validate_deq_options(self.deq_options, **changes)
        self.solver = EquilibriumSolver(**self.deq_options)

    @property
    def num_states(self) -> int:
        """How many decoded states ``trajectory`` returns (the ``grad`` tracked steps)."""
        return self.deq_options["grad"]

    @property
    def input_spec(self) -> InputSpec:
        """Per-sample inputs: the latent (C, R, R), the classes, and z0 (N, D); ``get.seeds.draw_inputs`` draws them."""
        tokens = (self.input_size // self.patch_size) ** 2
        return InputSpec(self.in_channels, self.input_size, self.num_classes, (tokens, self.hidden_size))

    def _condition(self, c, sigma, noise):
        """The qkv shift (B, 1, 3D) or None: the class embedding c plus, when noise_cond, the noise-level embedding."""
        if not self.noise_cond:
            if sigma is not None:
                raise ValueError("sigma was given but this GET has no noise-level input (noise_cond=False)")
            return c
        if sigma is None:
            raise ValueError("this GET is noise-conditioned (noise_cond=True): pass sigma=... (a scalar or (B,))")
        dtype = torch.promote_types(noise.dtype, torch.float32)  # ln(sigma) at least in float32, also for bf16 inputs
        sigma = as_sigma(sigma, noise.shape[0], noise.device, dtype, "GET", self.check_finite)  # (B,)
        shift = self.noise_embedder(sigma)  # (B, 1, 3D)
        return shift if c is None else c + shift

    def _prepare(self, noise, class_labels, z0, generator, sigma=None):
        """Everything before the solve: InjT once, the per-block injections, and z_0."""
        c = self._condition(self._check_inputs(noise, class_labels), sigma, noise)
        ops = self._ops(noise.device)
        x = self.embed(noise)  # (B, N, D)
        for block in self.blocks:
            x = block(x, ops, c)
        u = self.qkv_inj(x).chunk(self.deq_depth, dim=-1)  # deq_depth x (B, N, 3D): one injection per block
        if z0 is None:
            # Drawn after the InjT as the official randn_like(x), and on x's official layout: timm's PatchEmbed
            # transposes the conv output, so x is (B, N, D) with strides (N·D, 1, N), and randn_like keeps them. The
            # CPU generator fills a non-contiguous tensor with another algorithm than a contiguous one, so only the
            # same layout gives the same z_0 for the same seed.
            B, N, D = x.shape
            z0 = torch.empty_strided((B, N, D), (N * D, 1, N), device=x.device, dtype=x.dtype)
            z0 = z0.normal_(generator=generator).contiguous()  # (B, N, D)
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

    def forward(self, noise, class_labels=None, z0=None, generator=None, return_info=False, *, sigma=None):
        """One-step generation: ``eval_f_max_iter`` fixed-point iterations, lowest-residual iterate, decode.

        Args:
            noise: (B, C, H, W) unit Gaussian noise (EDM's latent before scaling by sigma_max).
            class_labels: (B,) int64 in [0, num_classes) for a conditional model, else None.
            z0: (B, N, D) initial equilibrium state; default Gaussian from ``generator``.
            generator: torch.Generator for z_0, so a forward pass is reproducible.
            return_info: also return solver statistics (``abs_trace`` (B, K), ``abs_lowest``, ``nstep``, ...).
            sigma: noise level(s) in EDM units (noise standard deviation), a scalar or (B,), > 0; required when the
                model has ``noise_cond``, refused otherwise.

        Returns:
            images (B, C, H, W), and the info dict when ``return_info``.

        Raises:
            NonFiniteError: when the solve produced NaN or inf.
        """
        f, z0, ops = self._prepare(noise, class_labels, z0, generator, sigma)
        z_star, info = self.solver.solve(f, z0)  # (B, N, D)
        images = torch.where(self._finite_samples(noise), self.decode(z_star, ops), torch.nan)  # (B, C, H, W)
        # The selection never picks a NaN iterate (NaN < r is False), so check the residuals too.
        self._check_finite(info["abs_trace"], images)
        return (images, info) if return_info else images

    def trajectory(self, noise, class_labels=None, z0=None, generator=None, return_info=False, *, sigma=None):
        """Training path: the decoded states of the ``grad`` (6) gradient-tracked fixed-point steps; arguments as
        :meth:`forward`.

        Returns:
            list of ``grad`` images (B, C, H, W), first to last, for the fixed-point-correction loss; with
            ``return_info`` also a dict with the step residuals ``abs_trace`` (B, grad).

        Raises:
            NonFiniteError: when a state is NaN or inf.
        """
        f, z0, ops = self._prepare(noise, class_labels, z0, generator, sigma)
        states, info = self.solver.trajectory(f, z0)
        ok = self._finite_samples(noise)
        images = [torch.where(ok, self.decode(z, ops), torch.nan) for z in states]
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
        images = torch.where(self._finite_samples(noise), self.decode(x, ops), torch.nan)
        self._check_finite(images)
        return (images, {}) if return_info else images

    def trajectory(self, noise, class_labels=None, z0=None, generator=None, return_info=False):
        """The training path: a one-element list with the forward's images (and its info)."""
        out = self.forward(noise, class_labels, z0, generator, return_info=return_info)
        return ([out[0]], out[1]) if return_info else [out]


#################################################################################
#                           Official checkpoints                                #
#################################################################################


def _load_state_dict(model, state_dict: dict, add_noise_embedder: bool, where: str) -> list[str]:
    """Strict load, except that with ``add_noise_embedder`` a file without any noise-embedder key loads: those keys
    keep the model's initial values. Returns them (the new keys); a file with only some of them fails to load."""
    new_keys = []
    if add_noise_embedder and not any(k.startswith("noise_embedder.") for k in state_dict):
        own = model.state_dict()
        new_keys = [k for k in own if k.startswith("noise_embedder.")]
        state_dict = {**state_dict, **{k: own[k] for k in new_keys}}
        logger.info("%s: noise_cond=True: %d new key(s) start at their initial values (zero last layer, so the "
                    "outputs are unchanged): %s", where, len(new_keys), ", ".join(new_keys))
    model.load_state_dict(state_dict, strict=True)
    return new_keys


def _fold_weight_norm(state_dict: dict, where: str) -> dict:
    """torchdeq weight norm stores weight = g · v / ‖v‖ (norm over all dims but 0) as ``weight_g``/``weight_v``."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith((".weight_g", ".weight_v")):
            stem = key[: -len(".weight_g")]
            g, v = state_dict.get(stem + ".weight_g"), state_dict.get(stem + ".weight_v")
            if g is None or v is None:
                missing = stem + (".weight_g" if g is None else ".weight_v")
                raise ValueError(f"{where}: {key} without {missing} (torchdeq weight norm stores both)")
            if v.dim() < 1 or g.numel() != v.shape[0]:
                raise ValueError(f"{where}: {stem}.weight_g {tuple(g.shape)} does not fit weight_v {tuple(v.shape)}")
            if key.endswith(".weight_v"):
                norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
                out[stem + ".weight"] = g.reshape(norm.shape) * v / norm
        else:
            out[key] = value
    return out


# Bounds on GET sizes read from a file: generous beyond every official config; the sizes must also match the
# tensors (see _check_config), so a small file cannot make the constructor allocate a large model.
_INT_BOUNDS = {"input_size": (1, 1024), "patch_size": (1, 64), "in_channels": (1, 64), "hidden_size": (4, 8192),
               "depth": (0, 256), "num_heads": (1, 1024), "deq_depth": (1, 64), "num_classes": (0, 100_000)}


def _tensor(state_dict: dict, key: str, ndim: int, where: str) -> torch.Tensor:
    t = state_dict.get(key)
    if t is None:
        raise KeyError(f"{where}: not a GET state dict: missing key {key!r}")
    if not isinstance(t, torch.Tensor) or t.dim() != ndim:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{where}: {key} must be a {ndim}-d tensor, got {got}")
    return t


def _block_count(state_dict: dict, prefix: str, where: str) -> int:
    indices = {k.split(".")[1] for k in state_dict if k.startswith(prefix + ".")}
    if indices != {str(i) for i in range(len(indices))}:
        raise ValueError(f"{where}: {prefix} indices must be 0..n-1, got {sorted(indices)[:8]}")
    return len(indices)


def _shape_config(state_dict: dict, where: str, deq: bool = True) -> dict:
    """The sizes a GET (``deq``) or ViT state dict fixes: image and patch size, D, block counts, MLP widths, classes."""
    pos = _tensor(state_dict, "pos_embed", 3, where)
    patch_w = _tensor(state_dict, "x_embedder.proj.weight", 4, where)
    _, N, D = pos.shape
    grid = math.isqrt(N)
    if pos.shape[0] != 1 or grid * grid != N or N == 0:
        raise ValueError(f"{where}: pos_embed {tuple(pos.shape)} is not (1, grid², D)")
    if patch_w.shape[0] != D or patch_w.shape[2] != patch_w.shape[3]:
        raise ValueError(f"{where}: x_embedder.proj.weight {tuple(patch_w.shape)} is not (D={D}, C, p, p)")
    table = state_dict.get("y_embedder.embedding_table.weight")
    out = dict(input_size=grid * patch_w.shape[2], patch_size=patch_w.shape[2], in_channels=patch_w.shape[1],
               hidden_size=D, depth=_block_count(state_dict, "blocks", where),
               num_classes=0 if table is None else _tensor(state_dict, "y_embedder.embedding_table.weight", 2,
                                                            where).shape[0])
    if out["depth"]:
        out["mlp_width"] = _tensor(state_dict, "blocks.0.mlp.fc1.weight", 2, where).shape[0]
    if deq:
        out["deq_depth"] = _block_count(state_dict, "deq_blocks", where)
        out["deq_mlp_width"] = _tensor(state_dict, "deq_blocks.0.mlp.fc1.weight", 2, where).shape[0]
    return out


def _check_config(model_cls, config: dict, state_dict: dict, where: str) -> None:
    """Constructor keywords from a file: known names, bounded sizes, and sizes equal to the tensors' shapes, checked
    before the model is built."""
    signature = inspect.signature(model_cls.__init__).parameters
    unknown = sorted(set(config) - set(signature) - {"self"})
    if unknown:
        raise ValueError(f"{where}: unknown {model_cls.__name__} argument(s) {unknown}")
    full = {k: p.default for k, p in signature.items() if k != "self"} | config
    for key, bounds in _INT_BOUNDS.items():
        if key in full:
            check_int(full[key], key, *bounds, where)
    for key in ("mlp_ratio", "deq_mlp_ratio"):
        if key in full and not 0 < check_number(full[key], key, where) <= 64:
            raise ValueError(f"{where}: {key} must be in (0, 64], got {full[key]!r}")
    shapes = _shape_config(state_dict, where, deq=model_cls is GET)
    D = shapes["hidden_size"]
    widths = {"mlp_width": "mlp_ratio", "deq_mlp_width": "deq_mlp_ratio"}
    wrong = [f"{key}={full[key]} (weights: {value})" for key, value in shapes.items()
             if key not in widths and full[key] != value]
    wrong += [f"{widths[key]}={full[widths[key]]} (weights: width {value} for D={D})" for key, value in shapes.items()
              if key in widths and int(D * full[widths[key]]) != value]
    if wrong:
        raise ValueError(f"{where}: the config does not match the weights: {', '.join(wrong)}")
    if D % full["num_heads"]:
        raise ValueError(f"{where}: num_heads={full['num_heads']} does not divide the hidden size {D}")


def config_from_official_state_dict(state_dict: dict, args: dict | None = None, num_heads: int | None = None,
                                    where: str = "state dict") -> dict:
    """Infers GET constructor arguments from an official state dict (docs/GET.md) and its ``args``.

    The number of heads is not in the shapes: it comes from ``num_heads``, else from the registered config named by
    ``args['model']`` (e.g. 'GET-B/2'), else D / 64 (every official config) when D is a multiple of 64.
    """
    args = args or {}
    shapes = _shape_config(state_dict, where)
    D = shapes["hidden_size"]
    name = args.get("model")
    if num_heads is None and name is not None:
        spec = getattr(GET_models.get(name) if isinstance(name, str) else None, "config", None)
        if spec is None or "deq_mlp_ratio" not in spec:
            raise ValueError(f"{where}: args.model={name!r} is not a registered GET config "
                             f"({[k for k in GET_models if k.startswith('GET')]})")
        if (spec["hidden_size"], spec["depth"]) != (D, shapes["depth"]):
            raise ValueError(f"{where}: args.model={name!r} has hidden_size {spec['hidden_size']} and depth "
                             f"{spec['depth']}, the weights {D} and {shapes['depth']}")
        num_heads = spec["num_heads"]
    elif num_heads is None:
        if D % 64:
            raise ValueError(f"{where}: cannot infer num_heads: no args.model and hidden size {D} is not a multiple "
                             f"of 64 (pass num_heads=...)")
        num_heads = D // 64  # head dim 64 in every official config
    input_size = shapes["input_size"]
    if "input_size" in args:
        check_int(args["input_size"], "args.input_size", *_INT_BOUNDS["input_size"], where)
        if args["input_size"] != input_size:
            raise ValueError(f"{where}: args.input_size={args['input_size']} but pos_embed and the patch size give "
                             f"{input_size}")
    return dict(
        input_size=input_size,
        patch_size=shapes["patch_size"],
        in_channels=shapes["in_channels"],
        hidden_size=D,
        depth=shapes["depth"],
        num_heads=num_heads,
        mlp_ratio=shapes["mlp_width"] / D if shapes["depth"] else 4.0,
        deq_depth=shapes["deq_depth"],
        deq_mlp_ratio=shapes["deq_mlp_width"] / D,
        num_classes=shapes["num_classes"],
    )


def _read_official_checkpoint(path: Path, ema: bool, map_location, num_heads: int | None = None):
    """Reads an official trainer .pth safely: weights_only, with argparse.Namespace as the only allowed class, every
    tensor checked against its storage and every entry's type checked before use."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    check_torch_zip(path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not readable as an official GET checkpoint with weights_only=True ({e})") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    key = "ema" if ema and "ema" in ckpt else "model"
    if key not in ckpt:
        raise KeyError(f"{path}: no 'model' or 'ema' entry (keys: {sorted(k for k in ckpt if isinstance(k, str))})")
    raw = ckpt[key]
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: ckpt[{key!r}] is a {type(raw).__name__}, not a state dict")
    for name, value in raw.items():
        if not isinstance(name, str):
            raise ValueError(f"{path}: ckpt[{key!r}] has a key of type {type(name).__name__}, not str")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: ckpt[{key!r}][{name!r}] is a {type(value).__name__}, not a tensor")
        if error := tensor_layout_error(value):
            raise ValueError(f"{path}: ckpt[{key!r}][{name!r}]: {error}")
    if error := total_bytes_error(raw.values(), path.stat().st_size):
        raise ValueError(f"{path}: ckpt[{key!r}]: {error}")
    state_dict = _fold_weight_norm({k.removeprefix("module."): v for k, v in raw.items()}, f"{path}: ckpt[{key!r}]")
    args = ckpt.get("args")
    if not isinstance(args, (argparse.Namespace, dict, type(None))):
        raise ValueError(f"{path}: ckpt['args'] is a {type(args).__name__}, not a Namespace")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    return config_from_official_state_dict(state_dict, args, num_heads, str(path)), state_dict


#################################################################################
#                                   Configs                                     #
#################################################################################


def _get(hidden_size, num_heads, depth, deq_mlp_ratio):
    config = dict(hidden_size=hidden_size, num_heads=num_heads, depth=depth, deq_mlp_ratio=deq_mlp_ratio)

    def make(**kwargs):
        return GET(**{**config, **kwargs})

    make.config = config  # read by config_from_official_state_dict (args.model -> num_heads)
    return make


def _vit(hidden_size, num_heads, depth):
    config = dict(hidden_size=hidden_size, num_heads=num_heads, depth=depth)

    def make(**kwargs):
        return ViT(**{**config, **kwargs})

    make.config = config
    return make


# Official names (locuslab/get GET_models; suffixes there are InjT depth, EqT depth, EqT MLP ratio), the paper's
# ViT baselines, and small configs for tests and CPU demos. Keyword arguments override, e.g. num_classes=10.
class _Registry(dict):
    """The config names; an unknown name raises a KeyError that lists them."""

    def __missing__(self, name):
        raise KeyError(f"unknown model config {name!r}; choose one of {list(self)}")


GET_models = _Registry({
    "GET-T/2": _get(256, 4, 6, 6),
    "GET-M/2": _get(384, 6, 6, 6),
    "GET-S/2": _get(512, 8, 6, 8),
    "GET-B/2": _get(768, 12, 1, 12),
    "GET-B/2+": _get(768, 12, 6, 8),
    "ViT-B/2": _vit(768, 12, 12),
    "ViT-L/2": _vit(1024, 16, 24),
    "GET-XS/2": _get(128, 2, 2, 4),
    "GET-XXS/2": _get(64, 2, 1, 2),
})


def create_model(name: str, **kwargs) -> GET | ViT:
    """Builds a registered config by name; a clear error lists the names when it is unknown."""
    return GET_models[name](**kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameter count; the official totals include the frozen pos_embed."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["GET", "ViT", "GET_models", "NonFiniteError", "create_model", "count_parameters", "sincos_pos_embed"]
