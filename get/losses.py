"""Regression losses for distillation and the fixed-point-correction weighting of GET.

Every loss maps a prediction and a target of shape (B, C, H, W) to a scalar: the mean over the batch of a per-sample
distance. `fp_correction` applies one of them to each state of a GET trajectory and sums them with the weights
0.8^(n-k-1), as the official trainer does through `torchdeq.loss.fp_correction` (docs/GET.md), but without its host
syncs: the per-state values come back as one detached tensor.
"""

import os
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

LOSSES = ("l1", "l2", "pseudo-huber", "lpips")

# ----------------------------------------------------------------------------
# Pixel losses.


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over all elements (the official GET loss)."""
    return (pred - target).abs().mean()


def l2_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements."""
    return (pred - target).square().mean()


def pseudo_huber_loss(pred: torch.Tensor, target: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """Pseudo-Huber loss sqrt(||pred - target||² + c²) - c per sample, averaged over the batch.

    As in improved consistency training (Song & Dhariwal, 2023): the norm is over the d = C·H·W values of each sample
    and c defaults to 0.00054·sqrt(d) (0.03 for 3×32×32). It behaves like L2 for errors much smaller than c and like
    an unsquared L2 norm for large ones.

    Args:
        pred: (B, C, H, W) prediction.
        target: (B, C, H, W) target.
        c: the transition scale in pixel units; None picks 0.00054·sqrt(d).
    """
    d = pred[0].numel()
    c = 0.00054 * d**0.5 if c is None else c
    sq = (pred - target).flatten(1).square().sum(dim=1)  # (B,)
    return ((sq + c * c).sqrt() - c).mean()


# ----------------------------------------------------------------------------
# LPIPS (Zhang et al., 2018), VGG16 variant, with weights read from local files only.

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 weights
LPIPS_LIN_FILE = "vgg.pth"  # the lpips package's v0.1 linear heads (lpips/weights/v0.1/vgg.pth)
_VGG_TAPS = (4, 9, 16, 23, 30)  # ends of the slices after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_VGG_CHANNELS = (64, 128, 256, 512, 512)


def lpips_weight_paths() -> tuple[str, str]:
    """Default locations of the VGG16 and LPIPS files: torch hub's checkpoint folder ($TORCH_HOME/hub/checkpoints)."""
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    return os.path.join(folder, VGG16_FILE), os.path.join(folder, "lpips_" + LPIPS_LIN_FILE)


LPIPS_FILES = ("torchvision VGG16 ImageNet weights (vgg16-397923af.pth)",
               "LPIPS v0.1 VGG linear heads (vgg.pth from the lpips package)")  # what each of the two files is


def resolve_lpips_paths(vgg_path: str | None = None, lin_path: str | None = None) -> tuple[str, str]:
    """The VGG16 and LPIPS-head files LPIPS will read (they may not exist): the given paths, else the defaults of
    :func:`lpips_weight_paths`, the heads falling back to an installed ``lpips`` package's copy."""
    default_vgg, default_lin = lpips_weight_paths()
    vgg_path = vgg_path or default_vgg
    if lin_path is None:
        lin_path = default_lin
        try:
            import lpips as lpips_pkg  # optional: the reference package ships the heads

            pkg_lin = os.path.join(os.path.dirname(lpips_pkg.__file__), "weights", "v0.1", LPIPS_LIN_FILE)
            lin_path = lin_path if os.path.isfile(lin_path) else pkg_lin
        except ImportError:
            pass
    return vgg_path, lin_path


class LPIPS(nn.Module):
    """LPIPS v0.1 with VGG16 features, frozen, for images in [-1, 1].

    Both images are resized (bilinear) to `resize` pixels first, as the official GET and DMD trainers do (they resize
    to 224). The distance is the lpips package's: per tap, unit-normalise the features along channels, weight the
    squared difference by the learned non-negative 1×1 heads, average over space, then sum over the 5 taps.

    Args:
        vgg_path: torchvision VGG16 state dict (`vgg16-397923af.pth`); None looks in torch hub's checkpoint folder.
        lin_path: the lpips package's `weights/v0.1/vgg.pth`; None looks for `lpips_vgg.pth` in the same folder,
            then inside an installed `lpips` package.
        resize: side length in pixels both images are resized to; None keeps the input size.

    Raises:
        FileNotFoundError: a weight file is missing; the message says what to place where.
    """

    def __init__(self, vgg_path: str | None = None, lin_path: str | None = None, resize: int | None = 224):
        super().__init__()
        import torchvision

        vgg_path, lin_path = resolve_lpips_paths(vgg_path, lin_path)
        for path, what in zip((vgg_path, lin_path), LPIPS_FILES):
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"LPIPS needs the {what}, not found at {path}. Place the file there (this machine has no "
                    f"internet access to download it), or pass its path, or choose --loss l1|l2|pseudo-huber.")
        vgg = torchvision.models.vgg
        features = vgg.make_layers(vgg.cfgs["D"], batch_norm=False)  # VGG16's features, without the classifier
        vgg_state = torch.load(vgg_path, map_location="cpu", weights_only=True)
        features.load_state_dict({k[len("features."):]: v for k, v in vgg_state.items() if k.startswith("features.")})
        self.slices = nn.ModuleList(features[a:b] for a, b in zip((0,) + _VGG_TAPS[:-1], _VGG_TAPS))
        lin_state = torch.load(lin_path, map_location="cpu", weights_only=True)
        lins = []
        for i, ch in enumerate(_VGG_CHANNELS):
            w = lin_state[f"lin{i}.model.1.weight"]
            if w.shape != (1, ch, 1, 1):
                raise ValueError(f"{lin_path}: lin{i}.model.1.weight has shape {tuple(w.shape)}, "
                                 f"expected (1, {ch}, 1, 1)")
            lins.append(w.float())
        self.register_buffer("lins", torch.cat([w.flatten() for w in lins]), persistent=False)  # (1472,)
        # The lpips ScalingLayer: maps [-1, 1] inputs to ImageNet-normalised ones.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.resize = resize
        self.requires_grad_(False).eval()

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.resize is not None and x.shape[-1] != self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        h = (x - self.shift) / self.scale
        feats = []
        for s in self.slices:
            h = s(h)
            feats.append(h / (h.square().sum(dim=1, keepdim=True).sqrt() + 1e-10))  # unit norm along channels
        return feats

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample LPIPS distances (B,) between two (B, 3, H, W) batches in [-1, 1]."""
        if pred.shape[1] != 3:
            raise ValueError(f"LPIPS needs 3-channel images, got shape {tuple(pred.shape)}")
        heads = self.lins.split(list(_VGG_CHANNELS))
        dist = 0.0
        for fp, ft, w in zip(self._features(pred), self._features(target), heads):
            dist = dist + ((fp - ft).square() * w.view(1, -1, 1, 1)).sum(dim=1).mean(dim=(1, 2))  # (B,)
        return dist


# ----------------------------------------------------------------------------
# Loss factory and fixed-point correction.


def get_loss_fn(name: str, **kwargs) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The regression loss `name` (one of LOSSES) as a function (pred, target) -> scalar.

    kwargs go to the loss: `c` for pseudo-huber; `vgg_path`, `lin_path`, `resize` for lpips. The LPIPS network is
    built once here; call `.to(device)` on the returned object if it is a module.
    """
    if name == "l1":
        return l1_loss
    if name == "l2":
        return l2_loss
    if name == "pseudo-huber":
        c = kwargs.get("c")
        return lambda pred, target: pseudo_huber_loss(pred, target, c=c)
    if name == "lpips":
        return _MeanLPIPS(LPIPS(**kwargs))
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")


class _MeanLPIPS(nn.Module):
    def __init__(self, lpips: LPIPS):
        super().__init__()
        self.lpips = lpips

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dtype = self.lpips.shift.dtype  # the network's precision, whatever the images' dtype
        return self.lpips(pred.to(dtype), target.to(dtype)).mean()


def fp_correction_weights(n: int, gamma: float = 0.8) -> list[float]:
    """Weights gamma^(n-k-1) of the states k = 0..n-1; the last state gets 1 (torchdeq's 'exp' weight function)."""
    return [gamma ** (n - k - 1) for k in range(n)]


def fp_correction(
    crit: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    preds: Sequence[torch.Tensor],
    target: torch.Tensor,
    gamma: float = 0.8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-point-correction loss: sum_k gamma^(n-k-1) · crit(preds[k], target).

    The sum is unnormalised, as in the official GET trainer (the 6 weights sum to 3.68928). Unlike
    `torchdeq.loss.fp_correction(..., return_loss_values=True)` it does not call `.item()` per state.

    Args:
        crit: per-state loss (pred, target) -> scalar.
        preds: the n decoded trajectory states, each (B, C, H, W).
        target: (B, C, H, W) teacher images.
        gamma: weight decay factor towards earlier states (official: 0.8).

    Returns:
        loss: the weighted sum, a scalar with gradient.
        per_state: (n,) the detached unweighted loss of each state.
    """
    weights = fp_correction_weights(len(preds), gamma)
    losses = [crit(p, target) for p in preds]
    loss = sum(w * v for w, v in zip(weights, losses))
    return loss, torch.stack([v.detach().float() for v in losses])
