"""DisBack (Zhang et al., ICLR 2025): score distillation along the teacher's degradation path, walked backwards.

Score distillation evaluates the teacher's score on the generator's samples, which early in training lie where the
teacher is inaccurate ("score mismatch"). DisBack runs in two stages (docs/DISTILL.md, "DisBack"):

1. Degradation recording (Algorithm 1, :func:`record_degradation`). A copy s_theta' of the teacher's score network
   is trained by denoising score matching alone on samples of the frozen initial generator G^0, and a snapshot is kept
   every ``interval`` iterations: the path nodes s_theta'_i, i = 0 ... N, with node 0 the teacher and node N the most
   degraded (approximately the score of G^0's distribution).
2. Distribution backtracking (Algorithm 2, :class:`BacktrackingSchedule`, :class:`BacktrackingTarget`). The fake
   score starts from node N; the real-score target starts near node N and walks the path back to the teacher on a
   schedule of steps per node, after which distillation continues against the teacher.

The degradation path on disk (a folder; :func:`load_path`, :func:`load_node`)::

    path.json                 the manifest, rewritten atomically after every node:
        format, version       "get-disback-path", 1
        teacher               {"name", "sha256"}: the teacher's identity (Teacher.identity())
        generator             {"sha256"}: tensors_sha256 of the frozen initial generator's state dict
        network               the score network's config (its class and constructor arguments), or null
        settings              DegradationSettings.to_dict(): iterations, interval, lr, betas, batch, the sigma grid
                              and its sampled range, sigma_data, seed
        nodes                 [{"index": i, "file": "node-III.safetensors", "iteration", "sha256"}, ...], i = 0..N
                              in order; sha256 = get.io.tensors_sha256 of the node's tensors
        complete              whether every node of settings.node_iterations() is recorded
        resume                null, or {"file": "resume-IIIIIII.pt", "iteration", "sha256"} while incomplete: the
                              optimizer and RNG states at the last node's iteration (sha256 of the file's bytes)
    node-000.safetensors      the score network's state dict at iteration 0: the teacher (see record_degradation)
    node-001.safetensors ...  one state dict per snapshot; node N at the last iteration
    resume-IIIIIII.pt         torch.save zip of {"iteration", "optimizer", "rng"}; removed once complete

Every file is written atomically (get.io) and the manifest last, so a crash leaves the path as of its last manifest;
a node or resume file the manifest does not name is ignored and overwritten on resume. Nodes are never pruned.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from get.distill import dmd
from get.io import atomic_write_bytes, read_json, save_safetensors, tensors_sha256, write_json
from get.safety import check_int, check_number, check_torch_zip

__all__ = [
    "PATH_FORMAT", "PATH_VERSION", "MANIFEST", "PathError", "PathMismatchError", "DegradationSettings", "PathNode",
    "DegradationPath", "node_file", "resume_file", "load_path", "read_node", "load_node", "gaussian_latents",
    "record_degradation", "BacktrackingSchedule", "BacktrackingTarget",
]

logger = logging.getLogger(__name__)

PATH_FORMAT = "get-disback-path"
PATH_VERSION = 1
MANIFEST = "path.json"
MAX_NODES = 1000  # node files are named with three digits
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

SampleLatents = Callable[[int, torch.device], tuple[torch.Tensor, torch.Tensor | None]]


class PathError(ValueError):
    """A degradation path folder or node file that is malformed, corrupted, incomplete or does not fit a network."""


class PathMismatchError(PathError):
    """A degradation path recorded for another teacher, generator, network or settings than the caller's."""


# ----------------------------------------------------------------------------
# Settings.


@dataclass
class DegradationSettings:
    """How the degradation path is recorded (Algorithm 1); defaults are the paper's 64x64 ones where it gives them.

    Attributes:
        iterations: optimiser steps in total (the paper: 200 epochs; see :meth:`paper_64x64`).
        interval: a snapshot (path node) every this many iterations; the final state is always a node.
        lr, betas: Adam's (the paper: Adam, lr 1e-5 for both networks; betas are PyTorch's defaults).
        batch: generator samples per iteration (the paper: 4 GPUs x 8).
        num_sigmas, sigma_min, sigma_max, rho: the Karras grid sigma is drawn from (as DMD's fake score).
        sigma_range: fractions (low, high) of the grid to draw from; (0, 1) = all of it, as DMD's fake-score loss.
        sigma_data: EDM's sigma_data in the denoising-loss weight.
        seed: seeds the RNG of the whole recording (latents, labels, the generator's own draws, sigma, noise).
    """

    iterations: int
    interval: int
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    batch: int = 32
    num_sigmas: int = 1000
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_range: tuple[float, float] = field(default=(0.0, 1.0))
    sigma_data: float = 0.5
    seed: int = 0

    def __post_init__(self):
        where = "DegradationSettings"
        for key, high in (("iterations", 2 ** 40), ("interval", 2 ** 40), ("batch", 2 ** 20),
                          ("num_sigmas", 10 ** 6), ("seed", 2 ** 63 - 1)):
            check_int(getattr(self, key), key, 0 if key == "seed" else 1, high, where)
        for key in ("lr", "sigma_min", "sigma_max", "rho", "sigma_data"):
            if check_number(getattr(self, key), key, where) <= 0:
                raise ValueError(f"{where}: {key} must be > 0, got {getattr(self, key)!r}")
        self.betas = tuple(float(check_number(b, "betas", where)) for b in self.betas)
        self.sigma_range = tuple(float(check_number(s, "sigma_range", where)) for s in self.sigma_range)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"{where}: betas must be two numbers in [0, 1), got {self.betas}")
        if len(self.sigma_range) != 2 or not 0 <= self.sigma_range[0] <= self.sigma_range[1] <= 1:
            raise ValueError(f"{where}: sigma_range must be (low, high) with 0 <= low <= high <= 1, "
                             f"got {self.sigma_range}")
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"{where}: sigma_min {self.sigma_min} must be below sigma_max {self.sigma_max}")
        nodes = -(-self.iterations // self.interval) + 1  # counted before node_iterations() builds the list
        if nodes > MAX_NODES:
            raise ValueError(f"{where}: iterations {self.iterations} / interval {self.interval} make {nodes} path "
                             f"nodes, more than {MAX_NODES}")

    @classmethod
    def paper_64x64(cls, iterations_per_epoch: int, **overrides) -> DegradationSettings:
        """The paper's 64x64 setting: 200 epochs, a node every 50, so 5 nodes (i = 0 ... 4) with the teacher.

        An epoch is ``iterations_per_epoch`` iterations (the caller's choice, e.g. the teacher's data set size over
        the batch: the generator's samples are an endless stream).
        """
        check_int(iterations_per_epoch, "iterations_per_epoch", 1, 2 ** 30, "DegradationSettings.paper_64x64")
        return cls(iterations=200 * iterations_per_epoch, interval=50 * iterations_per_epoch, **overrides)

    def node_iterations(self) -> list[int]:
        """The iteration of every node: 0 (the teacher), each multiple of ``interval`` below ``iterations``, and
        ``iterations`` (Algorithm 1's final state): 200 / 50 -> [0, 50, 100, 150, 200]; 10 / 4 -> [0, 4, 8, 10]."""
        return list(range(0, self.iterations, self.interval)) + [self.iterations]

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data, where: str) -> DegradationSettings:
        """Settings from a manifest's JSON object: exactly the fields of this class; errors name ``where``."""
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise PathError(f"{where}: settings must have exactly the fields {sorted(names)}, got {got}")
        for key in ("betas", "sigma_range"):
            if not isinstance(data[key], list) or len(data[key]) != 2:
                raise PathError(f"{where}: settings.{key} must be a list of two numbers, got {data[key]!r}")
        try:
            return cls(**data)
        except ValueError as e:
            raise PathError(f"{where}: settings: {e}") from None


# ----------------------------------------------------------------------------
# The path on disk.


def node_file(index: int) -> str:
    """The file name of node ``index``: node-000.safetensors ... node-999.safetensors."""
    return f"node-{index:03d}.safetensors"


def resume_file(iteration: int) -> str:
    """The file name of the resume state at ``iteration``."""
    return f"resume-{iteration:07d}.pt"


@dataclass(frozen=True)
class PathNode:
    """One node of the path: its index i (0 = the teacher), file name, the iteration it was taken at, and the
    tensors_sha256 of its state dict."""

    index: int
    file: str
    iteration: int
    sha256: str


@dataclass
class DegradationPath:
    """A degradation path folder as its manifest describes it (:func:`load_path` verifies the node files).

    Attributes:
        folder: the folder.
        teacher: {"name", "sha256"} of the teacher.
        generator: {"sha256"} of the frozen initial generator's weights.
        network: the score network's config, or None.
        settings: how the path was recorded.
        nodes: the recorded nodes, i = 0 ... N in order.
        resume: the resume entry while recording is incomplete, else None.
    """

    folder: Path
    teacher: dict
    generator: dict
    network: dict | None
    settings: DegradationSettings
    nodes: list[PathNode]
    resume: dict | None = None

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST

    @property
    def complete(self) -> bool:
        """Whether every node of the settings' schedule is recorded."""
        return len(self.nodes) == len(self.settings.node_iterations())

    @property
    def last(self) -> int:
        """N, the index of the last (most degraded) recorded node."""
        return len(self.nodes) - 1

    @property
    def sha256(self) -> str:
        """The path's identity: a hash of the teacher, generator, settings and every node's sha256."""
        body = json.dumps([self.teacher, self.generator, self.settings.to_dict(), [n.sha256 for n in self.nodes]],
                          sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()

    def manifest(self) -> dict:
        return {"format": PATH_FORMAT, "version": PATH_VERSION, "teacher": self.teacher,
                "generator": self.generator, "network": self.network, "settings": self.settings.to_dict(),
                "nodes": [asdict(n) for n in self.nodes], "complete": self.complete, "resume": self.resume}

    def check(self, teacher=None, generator: nn.Module | None = None, network: nn.Module | None = None,
              settings: DegradationSettings | None = None) -> None:
        """Refuses a path recorded for another teacher, initial generator, score network or settings.

        Each argument given is compared with the manifest; the first difference raises PathMismatchError naming
        the manifest, the field and both values. A trainer calls it with its teacher and, before the first
        generator update, its (initial) generator.
        """
        self._compare(_identity(teacher, generator, network, settings))

    def _compare(self, identity: dict) -> None:
        """:meth:`check` on identity fields already computed by :func:`_identity`."""
        recorded = {"teacher": self.teacher, "generator": self.generator, "network": self.network,
                    "settings": self.settings.to_dict()}
        for key, value in identity.items():
            old = recorded[key]
            if old == value:
                continue
            name = key
            if isinstance(old, dict) and isinstance(value, dict):  # name the first differing entry
                sub = next(k for k in sorted(set(old) | set(value)) if old.get(k) != value.get(k))
                name, old, value = f"{key}.{sub}", old.get(sub), value.get(sub)
            raise PathMismatchError(f"{self.manifest_path}: this path was recorded with {name} = {_short(old)}, the "
                                    f"caller has {_short(value)}; use the same {key} or another path folder")


def _identity(teacher=None, generator: nn.Module | None = None, network: nn.Module | None = None,
              settings: DegradationSettings | None = None) -> dict:
    """The manifest's identity fields of whichever arguments are given."""
    out = {}
    if teacher is not None:
        ident = teacher.identity()
        out["teacher"] = {"name": ident["name"], "sha256": ident["sha256"]}
    if generator is not None:
        out["generator"] = {"sha256": tensors_sha256(generator.state_dict())}
    if network is not None:
        # A JSON round trip, so tuples compare equal to the lists read back from the manifest.
        out["network"] = json.loads(json.dumps(getattr(network, "config", None), default=str))
    if settings is not None:
        out["settings"] = settings.to_dict()
    return out


def _short(value, limit: int = 200) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def _few(keys: Sequence[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _check_sha(value, name: str, where: str) -> str:
    if not isinstance(value, str) or not _SHA256.match(value):
        raise PathError(f"{where}: {name} must be a sha256 hex digest (64 lowercase hex digits), got {value!r}")
    return value


def _parse_manifest(folder: Path) -> DegradationPath:
    """The manifest of ``folder``, every field checked; node and resume file names must be the expected ones, so
    nothing outside the folder is ever named."""
    where = str(folder / MANIFEST)
    m = read_json(folder / MANIFEST)
    if not isinstance(m, dict):
        raise PathError(f"{where}: the manifest must be a JSON object, got {type(m).__name__}")
    expected = {"format", "version", "teacher", "generator", "network", "settings", "nodes", "complete", "resume"}
    if set(m) != expected:
        raise PathError(f"{where}: the manifest must have exactly the fields {sorted(expected)}; missing "
                        f"{sorted(expected - set(m))}, unexpected {sorted(set(m) - expected)}")
    if m["format"] != PATH_FORMAT or m["version"] != PATH_VERSION:
        raise PathError(f"{where}: format {m['format']!r} version {m['version']!r} is not a degradation path "
                        f"({PATH_FORMAT!r} version {PATH_VERSION})")
    teacher, generator = m["teacher"], m["generator"]
    if not isinstance(teacher, dict) or set(teacher) != {"name", "sha256"} or not isinstance(teacher["name"], str):
        raise PathError(f"{where}: teacher must be {{'name': str, 'sha256': str}}, got {_short(teacher)}")
    _check_sha(teacher["sha256"], "teacher.sha256", where)
    if not isinstance(generator, dict) or set(generator) != {"sha256"}:
        raise PathError(f"{where}: generator must be {{'sha256': str}}, got {_short(generator)}")
    _check_sha(generator["sha256"], "generator.sha256", where)
    if m["network"] is not None and not isinstance(m["network"], dict):
        raise PathError(f"{where}: network must be an object or null, got {_short(m['network'])}")
    settings = DegradationSettings.from_dict(m["settings"], where)
    iterations = settings.node_iterations()
    nodes = m["nodes"]
    if not isinstance(nodes, list) or not 1 <= len(nodes) <= len(iterations):
        raise PathError(f"{where}: nodes must be a list of 1 to {len(iterations)} nodes (the settings' schedule), "
                        f"got {_short(nodes)}")
    parsed = []
    for i, node in enumerate(nodes):
        want = {"index": i, "file": node_file(i), "iteration": iterations[i]}
        if not isinstance(node, dict) or set(node) != {*want, "sha256"} or any(node[k] != v for k, v in want.items()):
            raise PathError(f"{where}: nodes[{i}] must be {{'index': {i}, 'file': {want['file']!r}, 'iteration': "
                            f"{want['iteration']}, 'sha256': ...}} (the settings' schedule), got {_short(node)}")
        parsed.append(PathNode(i, want["file"], want["iteration"], _check_sha(node["sha256"], f"nodes[{i}].sha256",
                                                                              where)))
    complete = len(parsed) == len(iterations)
    if m["complete"] is not complete:
        raise PathError(f"{where}: complete is {m['complete']!r} but {len(parsed)} of {len(iterations)} nodes are "
                        f"recorded")
    resume = m["resume"]
    if resume is not None:
        last = parsed[-1].iteration
        want = {"file": resume_file(last), "iteration": last}
        if complete or not isinstance(resume, dict) or set(resume) != {*want, "sha256"} or any(
                resume[k] != v for k, v in want.items()):
            raise PathError(f"{where}: resume must be null once complete, else {{'file': {want['file']!r}, "
                            f"'iteration': {last}, 'sha256': ...}} (the last node's), got {_short(resume)}")
        _check_sha(resume["sha256"], "resume.sha256", where)
    elif not complete and len(parsed) > 1:
        raise PathError(f"{where}: an incomplete path with {len(parsed)} nodes must have a resume entry")
    return DegradationPath(folder, teacher, generator, m["network"], settings, parsed, resume)


def load_path(folder: str | os.PathLike) -> DegradationPath:
    """Reads a degradation path folder, checking the manifest's every field and every node's sha256.

    Only files the manifest names, under the names the format allows, are read; the resume file is checked when
    :func:`record_degradation` uses it.

    Raises:
        FileNotFoundError: no folder, manifest or node file (named).
        PathError: a malformed manifest (the field is named) or a node whose tensors do not match their sha256.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: degradation path folder not found")
    path = _parse_manifest(folder)
    for node in path.nodes:
        read_node(path, node.index)
    return path


def read_node(path: DegradationPath, index: int) -> dict[str, torch.Tensor]:
    """The tensors of node ``index`` (on the CPU), after checking them against the manifest's sha256."""
    if not isinstance(index, int) or not 0 <= index <= path.last:
        raise PathError(f"{path.manifest_path}: no node {index!r}; the path has nodes 0 ... {path.last}")
    node = path.nodes[index]
    file = path.folder / node.file
    if not file.is_file():
        raise FileNotFoundError(f"{file}: node {index} of the degradation path is missing")
    try:
        tensors = load_file(file)
    except Exception as e:  # safetensors raises its own error types on malformed headers
        raise PathError(f"{file}: not a readable safetensors file ({e})") from None
    got = tensors_sha256(tensors)
    if got != node.sha256:
        raise PathError(f"{file}: the tensors' sha256 is {got}, {MANIFEST} records {node.sha256} for node {index} "
                        f"(corrupted or replaced file)")
    return tensors


def load_node(path: DegradationPath, index: int, network: nn.Module) -> PathNode:
    """Loads node ``index`` into ``network`` strictly: verified by sha256, every key present with the network's
    shape and dtype, no key missing or extra; otherwise PathError naming the file and the keys, and nothing loaded.

    Returns:
        The node loaded.
    """
    tensors = read_node(path, index)
    file = path.folder / path.nodes[index].file
    state = network.state_dict()
    missing, unexpected = sorted(state.keys() - tensors.keys()), sorted(tensors.keys() - state.keys())
    wrong = [f"{k} (file {tuple(tensors[k].shape)} {tensors[k].dtype}, network {tuple(state[k].shape)} "
             f"{state[k].dtype})" for k in sorted(state.keys() & tensors.keys())
             if tensors[k].shape != state[k].shape or tensors[k].dtype != state[k].dtype]
    if missing or unexpected or wrong:
        problems = [f"{what} {_few(keys)}" for what, keys in (("missing keys", missing), ("unexpected keys",
                    unexpected), ("other shapes or dtypes", wrong)) if keys]
        raise PathError(f"{file}: node {index} does not fit the {type(network).__name__} it is loaded into: "
                        f"{'; '.join(problems)}")
    network.load_state_dict(tensors, strict=True)
    return path.nodes[index]


# ----------------------------------------------------------------------------
# Degradation recording (Algorithm 1).


def gaussian_latents(channels: int, resolution: int, label_dim: int = 0) -> SampleLatents:
    """``sample_latents(batch, device)`` -> unit Gaussian latents (B, C, R, R) and uniform int64 labels (B,) (None
    when unconditional), drawn from the global RNG (which :func:`record_degradation` seeds and saves)."""

    def sample(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        latents = torch.randn(batch, channels, resolution, resolution, device=device)
        labels = torch.randint(label_dim, (batch,), device=device) if label_dim else None
        return latents, labels

    return sample


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """No gradients and eval mode (no batch-statistics updates) for the block; the caller's flags come back after."""
    grads = [p.requires_grad for p in module.parameters()]
    modes = [m.training for m in module.modules()]
    module.requires_grad_(False).eval()
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), grads):
            p.requires_grad_(flag)
        for m, mode in zip(module.modules(), modes):
            m.training = mode


def _check_start(teacher, score: nn.Module) -> None:
    """Algorithm 1 starts s_theta' as the teacher: a copy of an EDM teacher's network (every tensor of the score
    equal to the teacher's of the same name; the copy may leave unused layers out), or for a teacher without a network
    a ResidualFakeScore over it (the teacher plus a correction whose EDM output layer starts near zero)."""
    if dmd.is_edm_network(teacher):
        ours, theirs = score.state_dict(), teacher.state_dict()
        differ = [k for k, v in ours.items() if k not in theirs or theirs[k].shape != v.shape
                  or not torch.equal(theirs[k].to(v.device, v.dtype), v)]
        if not differ:
            return
        problem = f"its tensors {_few(differ)} are not the teacher's"
    elif isinstance(score, dmd.ResidualFakeScore) and score.teacher is teacher:
        return
    else:
        problem = f"it is a {type(score).__name__}"
    raise ValueError(f"record_degradation: the score network must start as the teacher {teacher.name} "
                     f"(Algorithm 1: s_theta' <- s_theta), but {problem}; build it with "
                     f"get.distill.dmd.make_fake_score(teacher, 'copy') for an EDM teacher or "
                     f"make_fake_score(teacher, 'residual') otherwise")


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _append_node(path: DegradationPath, score: nn.Module, iteration: int,
                 optimizer: torch.optim.Optimizer | None, device: torch.device) -> None:
    """Writes the next node, the resume state (while incomplete) and then the manifest; removes superseded resume
    files only after the manifest no longer names them."""
    index = len(path.nodes)
    file = path.folder / node_file(index)
    state = score.state_dict()
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise FloatingPointError(f"record_degradation: the score network has non-finite values in {_few(bad)} at "
                                 f"iteration {iteration}; node {index} ({file}) is not written")
    save_safetensors(file, state)  # no metadata: safetensors writes it in hash order, and nodes must be reproducible
    path.nodes.append(PathNode(index, file.name, iteration, tensors_sha256(state)))
    path.resume = None
    if not path.complete and optimizer is not None:
        buffer = io.BytesIO()
        torch.save({"iteration": iteration, "optimizer": optimizer.state_dict(), "rng": _rng_state(device)}, buffer)
        data = buffer.getvalue()
        atomic_write_bytes(path.folder / resume_file(iteration), data)
        path.resume = {"file": resume_file(iteration), "iteration": iteration,
                       "sha256": hashlib.sha256(data).hexdigest()}
    write_json(path.manifest_path, path.manifest())
    keep = path.resume["file"] if path.resume else None
    for stale in path.folder.glob("resume-*.pt"):
        if stale.name != keep:
            stale.unlink()


def _restore(path: DegradationPath, score: nn.Module, optimizer: torch.optim.Optimizer,
             device: torch.device) -> int:
    """Loads the last node, the optimizer and the RNG states of an incomplete path; returns the iteration."""
    file = path.folder / path.resume["file"]
    if not file.is_file():
        raise FileNotFoundError(f"{file}: the resume state named by {path.manifest_path} is missing")
    data = file.read_bytes()
    if hashlib.sha256(data).hexdigest() != path.resume["sha256"]:
        raise PathError(f"{file}: sha256 does not match {MANIFEST} (corrupted or replaced file)")
    check_torch_zip(file)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or set(state) != {"iteration", "optimizer", "rng"} or (
            state["iteration"] != path.resume["iteration"]):
        raise PathError(f"{file}: expected {{'iteration': {path.resume['iteration']}, 'optimizer', 'rng'}}")
    if ("cuda" in state["rng"]) != (device.type == "cuda"):
        recorded = "cuda" if "cuda" in state["rng"] else "cpu"
        raise PathError(f"{file}: recorded on {recorded}, resumed on {device.type}: the remaining nodes would not be "
                        f"the ones an uninterrupted recording writes; resume on {recorded}")
    load_node(path, path.last, score)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise PathError(f"{file}: the optimizer state does not fit the score network's parameters ({e})") from None
    torch.set_rng_state(state["rng"]["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    return state["iteration"]


def record_degradation(teacher, score: nn.Module, generator: nn.Module, sample_latents: SampleLatents,
                       folder: str | os.PathLike, settings: DegradationSettings,
                       log: Callable[[str], None] | None = None) -> DegradationPath:
    """Algorithm 1: records the degradation path of ``score`` towards the frozen initial generator's samples.

    Each iteration draws latents and labels, runs the generator without gradient, and takes one Adam step of
    denoising score matching alone (no GAN term) on its samples: ``dmd.fake_score_loss`` (EDM-weighted) at sigma
    from ``dmd.sample_sigma`` on the settings' Karras grid. Node 0 is the score's starting state (the teacher); a node
    is written every ``interval`` iterations and at the last one (:meth:`DegradationSettings.node_iterations`).

    The generator is never updated: it runs under no_grad with requires_grad off and in eval mode (its flags are
    restored afterwards), and its weights' sha256 is recorded and checked again at the end. The recording draws all
    its randomness from the global RNG, seeded from ``settings.seed`` (the caller's RNG state is restored on return).

    Resume: with ``folder`` holding an incomplete path of the same teacher, generator, network and settings,
    recording continues from its last node, optimizer and RNG states and writes the nodes an uninterrupted recording
    would have written. A complete path is returned as it is. Single process (no DDP).

    Args:
        teacher: the teacher (its ``identity()`` and ``label_dim`` are used).
        score: the network to degrade, trained in place: ``dmd.make_fake_score(teacher, 'copy')`` for an EDM
            teacher, ``make_fake_score(teacher, 'residual')`` for one without a network; on resume a fresh one built
            the same way (it must still equal node 0).
        generator: the initial generator G^0, ``generator(latents, labels)`` -> images (B, C, R, R).
        sample_latents: ``(batch, device)`` -> latents and int64 labels or None, from the global RNG
            (:func:`gaussian_latents`).
        folder: the path folder (created if needed).
        settings: iterations, interval, lr, batch, sigma sampling, seed.
        log: progress messages (default: this module's logger).

    Returns:
        The complete path.

    Raises:
        PathMismatchError: ``folder`` holds a path recorded for another teacher, generator, network or settings
            (the field is named).
        ValueError: ``score`` does not start as the teacher.
    """
    log = log or logger.info
    folder = Path(folder)
    device = next(score.parameters()).device
    _check_start(teacher, score)
    identity = _identity(teacher, generator, score, settings)
    if (folder / MANIFEST).is_file():
        path = load_path(folder)
        path._compare(identity)
        if path.complete:
            log(f"degradation path {folder}: complete ({len(path.nodes)} nodes), nothing to record")
            return path
        if tensors_sha256(score.state_dict()) != path.nodes[0].sha256:
            raise PathMismatchError(f"{folder / node_file(0)}: the score network's starting state differs from node "
                                    f"0 of this path; build it exactly as for the first run")
    else:
        path = DegradationPath(folder, identity["teacher"], identity["generator"], identity["network"], settings, [])
    snapshots = set(settings.node_iterations())
    optimizer = torch.optim.Adam([p for p in score.parameters() if p.requires_grad], lr=settings.lr,
                                 betas=settings.betas)
    grid = dmd.karras_sigmas(settings.num_sigmas, settings.sigma_min, settings.sigma_max, settings.rho, device)
    low, high = dmd.index_range(len(grid), *settings.sigma_range)
    score.train()
    with _frozen(generator), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if path.resume is None:  # a new path, or one stopped before its first snapshot: start from iteration 0
            if not path.nodes:
                _append_node(path, score, 0, None, device)
            torch.manual_seed(settings.seed)
            start = 0
        else:
            start = _restore(path, score, optimizer, device)
            log(f"degradation path {folder}: resuming at iteration {start} (node {path.last})")
        for iteration in range(start, settings.iterations):
            latents, labels = sample_latents(settings.batch, device)
            with torch.no_grad():
                x0 = generator(latents, labels).float()  # (B, C, R, R)
            sigma = dmd.sample_sigma(settings.batch, grid, low, high)  # (B,); sample_sigma draws from the global RNG
            loss = dmd.fake_score_loss(score, x0, sigma, torch.randn_like(x0), dmd.one_hot(labels, teacher.label_dim),
                                       settings.sigma_data)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if iteration + 1 in snapshots:
                _append_node(path, score, iteration + 1, optimizer, device)
                log(f"degradation path {folder}: node {path.last} at iteration {iteration + 1} "
                    f"(loss {loss.item():.4g})")
    if _identity(generator=generator)["generator"] != path.generator:
        raise RuntimeError("record_degradation: the generator's weights changed during the recording (its forward "
                           "must not modify parameters or buffers); the recorded path is not against G^0")
    return path


# ----------------------------------------------------------------------------
# Distribution backtracking (Algorithm 2).


class BacktrackingSchedule:
    """Which path node is the real-score target at each training step (Algorithm 2).

    The target starts at the most degraded node N and walks back: node i is the target for ``steps[i]`` consecutive
    steps, for i = N, N-1, ..., 1, and the teacher (node 0) for every step after. A node with 0 steps is skipped:
    ``{N: 0, ...}`` is the README pseudocode's reading, whose first target is node N-1 (the fake score already starts
    at node N).

    Args:
        steps: {node index: number of steps} for exactly the nodes 1 ... N.
    """

    def __init__(self, steps: Mapping[int, int]):
        nodes = sorted(steps) if isinstance(steps, Mapping) else None
        if not nodes or nodes != list(range(1, len(nodes) + 1)):
            raise ValueError(f"BacktrackingSchedule: steps must map exactly the nodes 1 ... N (N >= 1) to step "
                             f"counts, got {dict(steps) if isinstance(steps, Mapping) else steps!r}")
        for i in nodes:
            check_int(steps[i], f"steps[{i}]", 0, 2 ** 40, "BacktrackingSchedule")
        self.steps = {i: steps[i] for i in reversed(nodes)}  # in visiting order N ... 1
        self.num_nodes = len(nodes) + 1
        # The first step after each visited node (its exclusive end), and the node.
        self._ends, self._nodes, end = [], [], 0
        for i, n in self.steps.items():
            if n:
                end += n
                self._ends.append(end)
                self._nodes.append(i)

    @classmethod
    def from_rule(cls, num_nodes: int, rule: Callable[[int], int]) -> BacktrackingSchedule:
        """``rule(i)`` steps on node i, for i = 1 ... num_nodes - 1."""
        check_int(num_nodes, "num_nodes", 2, MAX_NODES, "BacktrackingSchedule")
        return cls({i: rule(i) for i in range(1, num_nodes)})

    @classmethod
    def paper_64x64(cls, num_nodes: int = 5) -> BacktrackingSchedule:
        """The paper's 64x64 schedule: 1,000 steps on each node i >= 3, 10,000 on each node i < 3 (i = 0 the
        teacher), then the teacher: with 5 nodes, nodes 4, 3, 2, 1 for 1k, 1k, 10k, 10k steps; the teacher from 22k."""
        return cls.from_rule(num_nodes, lambda i: 1000 if i >= 3 else 10000)

    @classmethod
    def uniform(cls, num_nodes: int, interval: int) -> BacktrackingSchedule:
        """The README pseudocode's schedule: the target moves one node towards the teacher every ``interval``
        steps, starting at node N - 1."""
        return cls.from_rule(num_nodes, lambda i: 0 if i == num_nodes - 1 else interval)

    @classmethod
    def parse(cls, spec: str, num_nodes: int) -> BacktrackingSchedule:
        """From a command-line string: 'paper', 'uniform:K', or comma-separated step counts for the nodes N, N-1,
        ..., 1 in visiting order ('1000,1000,10000,10000')."""
        if spec == "paper":
            return cls.paper_64x64(num_nodes)
        uniform = spec.startswith("uniform:")
        try:
            counts = [int(s) for s in spec.removeprefix("uniform:").split(",")]
        except ValueError:
            raise ValueError(f"backtracking schedule {spec!r}: expected 'paper', 'uniform:K' or comma-separated "
                             f"step counts for the nodes {num_nodes - 1} ... 1") from None
        if uniform and len(counts) == 1:
            return cls.uniform(num_nodes, counts[0])
        if len(counts) != num_nodes - 1:
            raise ValueError(f"backtracking schedule {spec!r}: {len(counts)} step counts for a path of {num_nodes} "
                             f"nodes; give one per node {num_nodes - 1} ... 1")
        return cls({num_nodes - 1 - k: n for k, n in enumerate(counts)})

    @property
    def teacher_step(self) -> int:
        """The first step whose target is the teacher (node 0): the sum of all steps."""
        return self._ends[-1] if self._ends else 0

    def target(self, step: int) -> int:
        """The node index that is the target at training step ``step`` (0-based)."""
        check_int(step, "step", 0, 2 ** 62, "BacktrackingSchedule.target")
        k = bisect.bisect_right(self._ends, step)
        return self._nodes[k] if k < len(self._nodes) else 0

    def switches(self) -> list[tuple[int, int, int]]:
        """(step, from, to) of every change of target, in order; the last one is at :attr:`teacher_step`."""
        return [(end, a, b) for end, a, b in zip(self._ends, self._nodes, self._nodes[1:] + [0])]

    def to_dict(self) -> dict:
        """{"steps": {"N": n_N, ..., "1": n_1}} in visiting order (JSON keys are strings)."""
        return {"steps": {str(i): n for i, n in self.steps.items()}}


class BacktrackingTarget:
    """The moving real score of Algorithm 2: ``network`` holds path node :attr:`index`, switched as the schedule says.

    Call :meth:`update` at the start of every training step, then use the object as the real score (it calls the
    network). Each switch loads the node strictly (:func:`load_node`) and is logged and returned as
    ``{"step", "from", "to", "file"}``. The fake score starts from the most degraded node:
    ``load_node(path, path.last, fake)``.

    Args:
        path: a complete degradation path (:func:`load_path`).
        network: a network of the path's architecture, separate from the teacher and the fake score (its weights are
            overwritten); made frozen (requires_grad off, eval mode).
        schedule: a schedule for as many nodes as the path has.
        log: switch messages (default: this module's logger).
    """

    def __init__(self, path: DegradationPath, network: nn.Module, schedule: BacktrackingSchedule,
                 log: Callable[[str], None] | None = None):
        if not path.complete:
            raise PathError(f"{path.manifest_path}: the degradation path is incomplete ({len(path.nodes)} of "
                            f"{len(path.settings.node_iterations())} nodes); finish record_degradation first")
        if schedule.num_nodes != len(path.nodes):
            raise ValueError(f"BacktrackingTarget: the schedule is for {schedule.num_nodes} nodes, the path "
                             f"{path.folder} has {len(path.nodes)}")
        self.path, self.network, self.schedule = path, network.requires_grad_(False).eval(), schedule
        self.log = log or logger.info
        self.index: int | None = None  # the node the network holds; None before the first update

    def update(self, step: int) -> dict | None:
        """Makes the network hold the schedule's target for training step ``step``; returns the switch or None."""
        want = self.schedule.target(step)
        if want == self.index:
            return None
        node = load_node(self.path, want, self.network)
        switch = {"step": step, "from": self.index, "to": want, "file": node.file}
        self.log(f"DisBack target at step {step}: node {self.index} -> node {want} ({self.path.folder / node.file})")
        self.index = want
        return switch

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None):
        """D_target(x; sigma, labels) of the node held."""
        if self.index is None:
            raise RuntimeError("BacktrackingTarget: no node loaded yet; call update(step) before using the target")
        return self.network(x, sigma, class_labels)

    def state_dict(self) -> dict:
        """The node held and the path's identity (the network's weights are the node's and are not saved)."""
        return {"index": self.index, "path_sha256": self.path.sha256}

    def load_state_dict(self, state: Mapping) -> None:
        """Restores :meth:`state_dict` and reloads the node held, so that the next :meth:`update` switches (or not)
        exactly as the saved run would have."""
        if not isinstance(state, Mapping) or set(state) != {"index", "path_sha256"}:
            raise ValueError(f"BacktrackingTarget.load_state_dict: expected keys ['index', 'path_sha256'], got "
                             f"{sorted(state) if isinstance(state, Mapping) else type(state).__name__}")
        if state["path_sha256"] != self.path.sha256:
            raise PathMismatchError(f"BacktrackingTarget.load_state_dict: the state is for another degradation path "
                                    f"(path_sha256 {state['path_sha256']!r}), not {self.path.folder} "
                                    f"({self.path.sha256})")
        index = state["index"]
        if index is not None:
            check_int(index, "index", 0, self.path.last, "BacktrackingTarget.load_state_dict")
            load_node(self.path, index, self.network)
        self.index = index
