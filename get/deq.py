"""The equilibrium solve of GET: validated torchdeq options, a sync-free fixed-iteration path, solver statistics.

Training follows the paper (docs/GET.md): ``f_max_iter = 0`` gradient-free iterations, then ``grad = 6`` unrolled,
gradient-tracked steps z_k = f(z_{k-1}) from z_0, all six states returned for the fixed-point-correction loss.
Evaluation (§6.3) runs ``eval_f_max_iter = 6`` fixed-point iterations and keeps, per sample, the iterate with the
lowest step residual ‖z_k − z_{k−1}‖ (strict "<", ties keep the earlier iterate), as torchdeq does; the option
``eval_select="last"`` returns the last iterate instead, which is what a generator trained on ``trajectory()[-1]``
(DMD / DMD2, train/train_dmd.py) was trained to produce.

torchdeq ignores unknown configuration keys silently (torchdeq issue #12), so every option is validated here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torchdeq import get_deq

SOLVERS = ("fixed_point_iter", "anderson", "broyden")
STOP_MODES = ("abs", "rel")
EVAL_SELECTS = ("lowest", "last")

# The paper's values (official run.sh / eval.sh resolved through torchdeq, docs/GET.md).
DEQ_DEFAULTS = dict(
    f_solver="fixed_point_iter",  # forward solver
    b_solver="fixed_point_iter",  # backward solver (implicit differentiation only)
    f_max_iter=0,  # gradient-free solver iterations before the tracked steps (training)
    eval_f_max_iter=6,  # solver iterations at evaluation
    f_tol=1e-3,  # forward early-exit tolerance (torchdeq eval path only)
    b_max_iter=40,  # backward solver iterations (implicit differentiation only)
    b_tol=1e-6,  # backward solver tolerance
    f_stop_mode="abs",  # residual used for selection and early exit
    grad=6,  # phantom-gradient (unrolled) steps in training
    tau=1.0,  # damping of the tracked steps: tau * f(z) + (1 - tau) * z
    ift=False,  # implicit differentiation instead of the last phantom-gradient step
    mem=False,  # gradient checkpointing of each equilibrium block
    sync_free=True,  # no host synchronisation: evaluation without the early exit (identical unless it would fire),
    # training without torchdeq's bookkeeping when f_max_iter = 0 (identical)
    eval_select="lowest",  # evaluation's iterate per sample: the lowest-residual one (paper), or the "last"
)


def validate_deq_options(options: dict | None = None, **overrides) -> dict:
    """Checks DEQ options and fills the paper's defaults.

    Args:
        options: a dict of options (keys of ``DEQ_DEFAULTS``); None for the defaults.
        **overrides: options that take precedence over ``options``.

    Returns:
        A new, complete dict of options.

    Raises:
        ValueError: for an unknown key, an unknown solver or an invalid value.
    """
    merged = dict(DEQ_DEFAULTS)
    given = {**(options or {}), **overrides}
    unknown = sorted(set(given) - set(DEQ_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown DEQ option(s) {unknown}; valid options are {sorted(DEQ_DEFAULTS)}")
    merged.update(given)
    for key in ("f_solver", "b_solver"):
        if merged[key] not in SOLVERS:
            raise ValueError(f"unknown DEQ solver {key}={merged[key]!r}; choose one of {SOLVERS}")
    if merged["f_stop_mode"] not in STOP_MODES:
        raise ValueError(f"f_stop_mode must be one of {STOP_MODES}, got {merged['f_stop_mode']!r}")
    if merged["eval_select"] not in EVAL_SELECTS:
        raise ValueError(f"DEQ option eval_select must be one of {EVAL_SELECTS}, got {merged['eval_select']!r}")
    if merged["eval_select"] == "last" and merged["f_solver"] != "fixed_point_iter":
        raise ValueError(f"DEQ option eval_select='last' needs f_solver='fixed_point_iter' (the iterates of "
                         f"{merged['f_solver']!r} are not the training path's), got {merged['f_solver']!r}")
    for key in ("f_max_iter", "eval_f_max_iter", "b_max_iter", "grad"):
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"DEQ option {key} must be a non-negative integer, got {value!r}")
    if merged["grad"] < 1:
        raise ValueError("DEQ option grad must be at least 1 (the number of gradient-tracked steps)")
    if merged["eval_f_max_iter"] < 1:
        raise ValueError("DEQ option eval_f_max_iter must be at least 1")
    for key in ("f_tol", "b_tol"):
        if not (isinstance(merged[key], (int, float)) and merged[key] > 0 and math.isfinite(merged[key])):
            raise ValueError(f"DEQ option {key} must be a positive number, got {merged[key]!r}")
    if merged["ift"] and merged["f_max_iter"] < 1:
        raise ValueError("DEQ option ift needs f_max_iter >= 1: implicit differentiation needs a solved fixed point")
    tau = merged["tau"]
    if not (isinstance(tau, (int, float)) and 0.0 < tau <= 1.0):
        raise ValueError(f"DEQ option tau must be in (0, 1], got {tau!r}")
    for key in ("ift", "mem", "sync_free"):
        if not isinstance(merged[key], bool):
            raise ValueError(f"DEQ option {key} must be a bool, got {merged[key]!r}")
    return merged


def _residuals(z_new: torch.Tensor, z_old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample absolute and relative step residuals, as torchdeq computes them."""
    abs_r = (z_new - z_old).flatten(1).norm(dim=1)  # (B,)
    rel_r = abs_r / (z_new.flatten(1).norm(dim=1) + 1e-9)  # (B,)
    return abs_r, rel_r


def fixed_point_iter_sync_free(
    f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, max_iter: int, tau: float = 1.0, stop_mode="abs",
    select: str = "lowest",
) -> tuple[torch.Tensor, dict]:
    """Fixed-point iteration with torchdeq's per-sample lowest-residual selection and no early exit.

    Nothing here reads a device value on the host, so the loop captures in CUDA graphs and compiles. It returns
    exactly what ``torchdeq.solver.fixed_point_iter`` returns whenever its early exit (all residuals < tol) would
    not have fired.

    Args:
        f: the map; it must preserve the shape of z.
        z0: (B, ...) the initial state.
        max_iter: number of iterations K.
        tau: damping, z ← tau·f(z) + (1 − tau)·z.
        stop_mode: 'abs' or 'rel': which residual selects the iterate.
        select: 'lowest' (the lowest-residual iterate per sample) or 'last' (z_K for every sample).

    Returns:
        z_star: (B, ...) the selected iterate; info: dict with ``abs_trace``/``rel_trace`` (B, K),
        ``abs_lowest``/``rel_lowest`` (B,), the lowest residuals, and ``nstep`` (B,), the 1-based index of the
        selected iterate.
    """
    z = z0
    z_star = z0
    B = z0.shape[0]
    lowest = torch.full((B,), float("inf"), device=z0.device, dtype=torch.float32)
    nstep = torch.zeros(B, device=z0.device, dtype=torch.long)
    abs_trace, rel_trace = [], []
    for k in range(1, max_iter + 1):
        z_new = tau * f(z) + (1 - tau) * z
        abs_r, rel_r = _residuals(z_new.float(), z.float())
        abs_trace.append(abs_r)
        rel_trace.append(rel_r)
        r = abs_r if stop_mode == "abs" else rel_r
        better = r < lowest  # (B,) strict: ties keep the earlier iterate
        lowest = torch.where(better, r, lowest)
        nstep = torch.where(better, torch.full_like(nstep, k), nstep)
        z_star = torch.where(better.view(B, *([1] * (z.dim() - 1))), z_new, z_star)
        z = z_new
    abs_trace = torch.stack(abs_trace, dim=1)  # (B, K)
    rel_trace = torch.stack(rel_trace, dim=1)  # (B, K)
    pick = (nstep - 1).clamp(min=0).unsqueeze(1)
    info = dict(
        abs_trace=abs_trace,
        rel_trace=rel_trace,
        abs_lowest=abs_trace.gather(1, pick).squeeze(1),
        rel_lowest=rel_trace.gather(1, pick).squeeze(1),
        nstep=nstep,
    )
    if select == "last":
        z_star, info["nstep"] = z, torch.full_like(nstep, max_iter)
    return z_star, info


def phantom_trajectory(
    f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, steps: int, tau: float = 1.0
) -> list[torch.Tensor]:
    """The paper's training path without a solver: ``steps`` gradient-tracked steps z_k = tau·f(z_{k−1}) +
    (1 − tau)·z_{k−1} from the detached z_0, every state returned.

    This is what torchdeq's phantom gradient computes when no gradient-free iterations come first
    (``f_max_iter = 0``), but without torchdeq's solver bookkeeping, which copies host values to the device on every
    call and so cannot be captured in a CUDA graph.
    """
    z = z0.detach()
    states = []
    for _ in range(steps):
        z = f(z) if tau == 1.0 else tau * f(z) + (1 - tau) * z
        states.append(z)
    return states


class EquilibriumSolver:
    """Solves z* = f(z*) for GET through torchdeq, with the paper's settings as defaults.

    Not an ``nn.Module``: it owns no parameters, and its train/eval behaviour is chosen per call
    (``trajectory`` for training, ``solve`` for sampling) instead of by a module flag.

    Example:
        >>> solver = EquilibriumSolver()
        >>> z_star, info = solver.solve(lambda z: 0.5 * torch.cos(z), torch.zeros(2, 3))
        >>> states, _ = solver.trajectory(lambda z: 0.5 * torch.cos(z), torch.zeros(2, 3))
        >>> len(states)
        6
    """

    def __init__(self, **options):
        self.options = validate_deq_options(options)
        o = self.options
        # An explicit dict, so torchdeq's config lookups see exactly these keys.
        torchdeq_args = dict(
            core="sliced",
            f_solver=o["f_solver"],
            b_solver=o["b_solver"],
            f_max_iter=o["f_max_iter"],
            eval_f_max_iter=o["eval_f_max_iter"],
            f_tol=o["f_tol"],
            b_max_iter=o["b_max_iter"],
            b_tol=o["b_tol"],
            f_stop_mode=o["f_stop_mode"],
            b_stop_mode="abs",
            grad=o["grad"],
            tau=o["tau"],
            sup_gap=1,  # return every tracked state: the 6 states of the fixed-point-correction loss
            ift=o["ift"],
            n_states=1,
            indexing=[],
            norm_type="none",
        )
        self._deq_train = get_deq(dict(torchdeq_args)).train()
        self._deq_eval = get_deq(dict(torchdeq_args)).eval()

    def trajectory(self, f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor) -> tuple[list, dict]:
        """Training path: ``f_max_iter`` gradient-free steps, then ``grad`` tracked steps.

        Returns:
            states: list of ``grad`` states [z_1 … z_grad] (``grad`` + 0 without ift; with ift the last
            state carries the implicit gradient); info: ``abs_trace`` (B, len(states)), the step residuals
            ‖z_k − z_{k−1}‖ of the returned states.
        """
        o = self.options
        if o["sync_free"] and o["f_max_iter"] == 0 and not o["ift"]:
            states = phantom_trajectory(f, z0, o["grad"], o["tau"])
        else:
            self._deq_train.train()
            states, _ = self._deq_train(f, z0)
        prev = [z0.detach()] + [s.detach() for s in states[:-1]]
        with torch.no_grad():
            abs_trace = torch.stack([_residuals(s.float(), p.float())[0] for s, p in zip(states, prev)], dim=1)
        return states, dict(abs_trace=abs_trace)

    @torch.no_grad()
    def solve(self, f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Evaluation path: ``eval_f_max_iter`` solver iterations without gradient.

        With ``f_solver='fixed_point_iter'`` and ``sync_free`` (default), or ``eval_select='last'`` (which has no
        early exit), this is :func:`fixed_point_iter_sync_free`; otherwise torchdeq's solver (with its early exit).
        """
        o = self.options
        if o["f_solver"] == "fixed_point_iter" and (o["sync_free"] or o["eval_select"] == "last"):
            return fixed_point_iter_sync_free(f, z0, o["eval_f_max_iter"], tau=1.0, stop_mode=o["f_stop_mode"],
                                              select=o["eval_select"])
        self._deq_eval.eval()
        (z_star,), info = self._deq_eval(f, z0)
        info = {k: v for k, v in info.items() if k != "sradius"}
        return z_star, info
