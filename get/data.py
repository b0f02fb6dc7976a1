"""Noise/image pair data sets: their settings, shard writer, manifest, verification, a memory-mapped dataset, an epoch
sampler and the training data order. Everything that reads or writes pairs goes through this module.

Layout of a pair folder (written by ``data_gen/generate.py``):

- ``shard-00000.safetensors``, ``shard-00001.safetensors``, ...: shard k holds the pairs of seeds
  ``seeds[k * shard_size:(k + 1) * shard_size]`` (a function of the seed list and the shard size only), in seed-list
  order, as the tensors ``noise`` (n, C, R, R) float32 (the unit Gaussian latent, before EDM multiplies it by
  sigma_max), ``image`` (n, C, R, R) float32 or float16 (the raw, unclipped sampler output), ``seed`` (n,) int64 and,
  for conditional teachers, ``label`` (n,) int64. The safetensors metadata has one key, "get-pairs": a JSON string
  with the format, its version, the shard index, its seeds and the sha256 fingerprint of the data set's settings.
- ``manifest.json``: format and version, the settings that define the data (:class:`PairSettings`: teacher identity
  with its weight hash, sampler, label policy, precision, generator device, tensor dtypes and shapes; plus the seeds
  and the shard size), then one entry per shard (file, seeds, count, sha256; sha256 is null until the shard is
  written) and ``complete``.

Every file is written under a temporary name and renamed when complete (``get.io``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from get.edm.sampler import check_sampler_settings
from get.io import atomic_write_bytes, json_sha256, read_json, write_json
from get.seeds import LABEL_POLICIES, format_seeds

FORMAT = "get-pairs"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

_DTYPES = {"float32": ("F32", np.float32, torch.float32), "float16": ("F16", np.float16, torch.float16),
           "int64": ("I64", np.int64, torch.int64)}
_ST_TO_NAME = {st: name for name, (st, _, _) in _DTYPES.items()}


class PairDataError(ValueError):
    """A pair folder, manifest or shard is missing, corrupt or inconsistent; the message names the file."""


class SettingsMismatchError(PairDataError):
    """The folder holds a data set made with other settings."""


# ----------------------------------------------------------------------------------------------------------------
# The shard plan.


def shard_name(index: int) -> str:
    """File name of shard ``index``."""
    return f"shard-{index:05d}.safetensors"


def shard_seeds(seeds: Sequence[int], shard_size: int) -> list[list[int]]:
    """Cuts the seed list into shards of ``shard_size`` consecutive entries (the last one may be shorter)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if len(seeds) == 0:
        raise ValueError("the seed list is empty")
    if len(set(seeds)) != len(seeds):
        seen = set()
        duplicate = next(s for s in seeds if s in seen or seen.add(s))
        raise ValueError(f"the seed list has duplicates (seed {duplicate}): each seed must give one pair")
    return [list(seeds[i:i + shard_size]) for i in range(0, len(seeds), shard_size)]


def tensor_spec(channels: int, resolution: int, label_dim: int, image_dtype: str = "float32") -> dict:
    """Dtypes and per-pair shapes of the shard tensors."""
    if image_dtype not in ("float32", "float16"):
        raise ValueError(f"image dtype must be float32 or float16, got {image_dtype!r}")
    shape = [channels, resolution, resolution]
    spec = {"noise": {"dtype": "float32", "shape": shape}, "image": {"dtype": image_dtype, "shape": shape},
            "seed": {"dtype": "int64", "shape": []}}
    if label_dim > 0:
        spec["label"] = {"dtype": "int64", "shape": []}
    return spec


# ----------------------------------------------------------------------------------------------------------------
# The settings that define a pair set.


def _number(value, key: str) -> float:
    """A float from the manifest, where infinities are stored as the strings "inf" / "-inf" (see :func:`jsonable`)."""
    if value in ("inf", "-inf"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PairDataError(f"settings: {key} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SamplerSettings:
    """EDM's Heun sampler settings of a pair set: the keywords of ``get.edm.edm_sampler`` (docs/EDM.md)."""

    num_steps: int = 18
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = math.inf
    S_noise: float = 1.0

    NAME = "edm_heun"

    def __post_init__(self):
        check_sampler_settings(**asdict(self))  # ValueError naming the setting

    def kwargs(self) -> dict:
        """``edm_sampler(teacher, latents, labels, **settings.kwargs())``; ``S_max`` may be ``inf``."""
        return asdict(self)

    def to_dict(self) -> dict:
        """The manifest's entry: the sampler's name and its keywords."""
        return {"name": self.NAME, **asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping) -> SamplerSettings:
        """Reads the manifest's entry ("inf" strings become float infinities)."""
        if d.get("name") != cls.NAME:
            raise PairDataError(f"settings: sampler {d.get('name')!r} is not {cls.NAME!r}")
        values = {}
        for f in fields(cls):
            if f.name not in d:
                raise PairDataError(f"settings: sampler misses {f.name!r}")
            values[f.name] = int(d[f.name]) if f.name == "num_steps" else _number(d[f.name], f"sampler.{f.name}")
        return cls(**values)


@dataclass(frozen=True)
class PairSettings:
    """Everything besides the seeds that decides a pair set: written to and read from ``manifest.json``.

    ``data_gen/generate.py`` writes it and every reader (training grids, DMD, evaluation) reads it back through
    :meth:`from_dict`, so the label policy and the generator device the pairs were drawn with are the ones used to
    draw further seeds (``get.seeds.draw_inputs``).

    Attributes:
        teacher: the teacher's ``identity()`` (name, sha256 of its weights, config).
        tensors: dtypes and per-pair shapes (:func:`tensor_spec`).
        label_dim: number of classes; 0 = unconditional.
        label_policy: ``'random'`` or ``'balanced'`` (``get.seeds``) for a conditional teacher, None otherwise;
            stored under the key "labels".
        sampler: the Heun sampler's settings.
        precision: the teacher's arithmetic ('fp32', 'tf32', 'bf16').
        rng_device: 'cpu' or 'cuda', the device of the per-seed generators (they give different numbers).
    """

    teacher: dict
    tensors: dict
    label_dim: int = 0
    label_policy: str | None = None
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    precision: str = "fp32"
    rng_device: str = "cpu"

    def __post_init__(self):
        if self.label_dim < 0:
            raise ValueError(f"label_dim must be >= 0, got {self.label_dim}")
        policy = (self.label_policy or "random") if self.label_dim > 0 else None
        if policy is not None and policy not in LABEL_POLICIES:
            raise ValueError(f"label_policy must be one of {LABEL_POLICIES}, got {policy!r}")
        object.__setattr__(self, "label_policy", policy)  # None exactly when unconditional
        if self.rng_device not in ("cpu", "cuda"):
            raise ValueError(f"rng_device must be 'cpu' or 'cuda', got {self.rng_device!r}")

    @classmethod
    def for_teacher(cls, teacher, sampler: SamplerSettings, label_policy: str = "random", precision: str = "fp32",
                    rng_device: str = "cpu", image_dtype: str = "float32") -> PairSettings:
        """The settings of pairs of ``teacher`` (a ``get.teachers.Teacher``)."""
        return cls(teacher=teacher.identity(), label_dim=teacher.label_dim, label_policy=label_policy,
                   sampler=sampler, precision=precision, rng_device=rng_device,
                   tensors=tensor_spec(teacher.channels, teacher.resolution, teacher.label_dim, image_dtype))

    def to_dict(self) -> dict:
        """JSON values (infinities as strings), under the manifest's keys."""
        return jsonable({"teacher": self.teacher, "sampler": self.sampler.to_dict(), "labels": self.label_policy,
                         "label_dim": self.label_dim, "precision": self.precision, "rng_device": self.rng_device,
                         "tensors": self.tensors})

    @classmethod
    def from_dict(cls, d: Mapping) -> PairSettings:
        """Reads the settings of a manifest (its seed list and shard size, also stored there, are not settings)."""
        missing = [k for k in ("teacher", "sampler", "labels", "label_dim", "precision", "rng_device", "tensors")
                   if k not in d]
        if missing:
            raise PairDataError(f"settings miss {missing}")
        try:
            return cls(teacher=d["teacher"], tensors=d["tensors"], label_dim=int(d["label_dim"]),
                       label_policy=d["labels"], sampler=SamplerSettings.from_dict(d["sampler"]),
                       precision=d["precision"], rng_device=d["rng_device"])
        except ValueError as e:
            raise PairDataError(f"settings: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# The manifest.


def jsonable(obj):
    """``obj`` as plain JSON values (inf as the string "inf", tuples as lists): settings compare after a round trip."""
    if isinstance(obj, float):
        if math.isnan(obj):
            raise ValueError("NaN in data set settings")
        return obj if math.isfinite(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    raise TypeError(f"data set settings must be JSON values, got {type(obj).__name__}: {obj!r}")


def settings_fingerprint(settings: dict) -> str:
    """sha256 of the canonical JSON of the settings."""
    return json_sha256(jsonable(settings))


def new_manifest(settings: PairSettings | Mapping, seeds: Sequence[int], shard_size: int) -> dict:
    """A manifest with no shard written yet.

    Args:
        settings: what defines the pairs besides the seeds (a manifest's settings dict is read with
            :meth:`PairSettings.from_dict`).
        seeds: the seed list, in order.
        shard_size: pairs per shard.
    """
    if not isinstance(settings, PairSettings):
        settings = PairSettings.from_dict(settings)
    plan = shard_seeds(seeds, shard_size)
    settings = {**settings.to_dict(), "seeds": format_seeds(seeds), "num_pairs": len(seeds), "shard_size": shard_size}
    shards = [{"file": shard_name(k), "seeds": format_seeds(s), "count": len(s), "sha256": None}
              for k, s in enumerate(plan)]
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "settings": settings, "shards": shards,
            "complete": False}


def read_manifest(root: str | os.PathLike) -> dict:
    """Reads and checks ``root/manifest.json``."""
    path = Path(root) / MANIFEST_NAME
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PairDataError(f"{path}: not a pair manifest (format {manifest.get('format')!r}, expected {FORMAT!r})"
                            if isinstance(manifest, dict) else f"{path}: not a pair manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PairDataError(f"{path}: format version {manifest.get('format_version')!r}; this code reads "
                            f"version {FORMAT_VERSION}")
    for key in ("settings", "shards", "complete"):
        if key not in manifest:
            raise PairDataError(f"{path}: missing key {key!r}")
    for key in ("tensors", "seeds", "num_pairs", "shard_size"):
        if key not in manifest["settings"]:
            raise PairDataError(f"{path}: settings miss {key!r}")
    counts = [int(s["count"]) for s in manifest["shards"]]
    if sum(counts) != manifest["settings"]["num_pairs"]:
        raise PairDataError(f"{path}: shard counts add up to {sum(counts)}, settings say "
                            f"{manifest['settings']['num_pairs']} pairs")
    return manifest


def write_manifest(root: str | os.PathLike, manifest: dict) -> None:
    """Writes ``root/manifest.json`` atomically."""
    write_json(Path(root) / MANIFEST_NAME, manifest)


def settings_diff(old, new, prefix: str = "") -> list[str]:
    """Readable differences 'key: old -> new' between two settings dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            name = f"{prefix}.{key}" if prefix else key
            if key not in old or key not in new:
                out.append(f"{name}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
            else:
                out += settings_diff(old[key], new[key], name)
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def open_manifest(root: str | os.PathLike, manifest: dict) -> dict:
    """The folder's manifest if its settings equal ``manifest``'s; else creates the folder and writes ``manifest``.

    Raises:
        SettingsMismatchError: the folder's manifest has other settings (it is never overwritten), or the folder has
            shard files but no manifest.
    """
    root = Path(root)
    path = root / MANIFEST_NAME
    if path.exists():
        existing = read_manifest(root)
        diff = settings_diff(existing["settings"], manifest["settings"])
        if diff or [s["file"] for s in existing["shards"]] != [s["file"] for s in manifest["shards"]]:
            raise SettingsMismatchError(
                f"{path} was made with other settings ({'; '.join(diff[:8]) or 'shard plan'}); it is never "
                f"overwritten: choose another output folder or rerun with the settings it records")
        return existing
    if root.is_dir() and any(root.glob("shard-*.safetensors")):
        raise SettingsMismatchError(f"{root} holds shard files but no {MANIFEST_NAME}; refusing to mix data sets: "
                                    f"choose another output folder")
    root.mkdir(parents=True, exist_ok=True)
    write_manifest(root, manifest)
    return manifest


def record_shards(manifest: dict, records: Sequence[dict]) -> dict:
    """Enters written shards (from :func:`write_shard`) into the manifest (in place) and updates ``complete``."""
    by_file = {s["file"]: i for i, s in enumerate(manifest["shards"])}
    for rec in records:
        entry = manifest["shards"][by_file[rec["file"]]]
        if rec["count"] != entry["count"] or rec["seeds"] != entry["seeds"]:
            raise PairDataError(f"{rec['file']}: record {rec} does not match the plan {entry}")
        entry["sha256"] = rec["sha256"]
    manifest["complete"] = all(s["sha256"] is not None for s in manifest["shards"])
    return manifest


# get.io.atomic_write_bytes's temporary names (".<final name>.<random>.tmp") for the files of a pair folder.
_TEMP_NAME = re.compile(r"\.(shard-\d{5}\.safetensors|manifest\.json|pairs\.png)\.[A-Za-z0-9_]+\.tmp")


def remove_stale_temps(root: str | os.PathLike) -> list[Path]:
    """Deletes the temporary files (shards, manifest, pairs.png) a killed run left behind in a pair folder; other
    files are never touched. Only one job may write a folder at a time."""
    stale = sorted(p for p in Path(root).iterdir() if _TEMP_NAME.fullmatch(p.name) and p.is_file())
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


# ----------------------------------------------------------------------------------------------------------------
# Shards.


def write_shard(root: str | os.PathLike, manifest: dict, index: int, tensors: dict[str, torch.Tensor]) -> dict:
    """Checks a shard's tensors against the manifest, writes it atomically and returns its record.

    Args:
        root: the pair folder.
        manifest: the folder's manifest (not modified; pass the record to :func:`record_shards`).
        index: shard index.
        tensors: noise (n, C, R, R), image (n, C, R, R), seed (n,) and label (n,) if conditional; converted to the
            manifest's dtypes (images are rounded to float16 here when the data set stores float16).

    Returns:
        {"file", "seeds", "count", "sha256"}.
    """
    settings, entry = manifest["settings"], manifest["shards"][index]
    spec = settings["tensors"]
    if set(tensors) != set(spec):
        raise ValueError(f"{entry['file']}: tensors {sorted(tensors)}, expected {sorted(spec)}")
    out = {}
    for name, t in tensors.items():
        shape = [entry["count"], *spec[name]["shape"]]
        if list(t.shape) != shape:
            raise ValueError(f"{entry['file']}: tensor {name!r} has shape {list(t.shape)}, expected {shape}")
        out[name] = t.detach().to("cpu", _DTYPES[spec[name]["dtype"]][2]).contiguous()
    if format_seeds(out["seed"].tolist()) != entry["seeds"]:
        raise ValueError(f"{entry['file']}: seeds {format_seeds(out['seed'].tolist())}, expected {entry['seeds']}")
    for name, t in out.items():
        # A data set never holds NaN or inf: a diverged sampler (or a float16 overflow) stops here, named by seed.
        bad = ~torch.isfinite(t.reshape(len(t), -1)).all(1) if t.is_floating_point() else None  # (n,)
        if bad is not None and bad.any():
            seeds = out["seed"][bad].tolist()
            shown = format_seeds(seeds[:32]) + (", ..." if len(seeds) > 32 else "")
            beyond = " or beyond float16's range" if t.dtype == torch.float16 else ""
            raise ValueError(f"{Path(root) / entry['file']}: tensor {name!r} is not finite (NaN or inf{beyond}) for "
                             f"{len(seeds)} of {entry['count']} seeds: {shown}; nothing written")
    # One metadata key: safetensors writes its metadata map in arbitrary order, and shard bytes must be reproducible.
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "shard": index, "seeds": entry["seeds"],
            "settings_sha256": settings_fingerprint(settings)}
    data = safetensors_bytes(out, metadata={FORMAT: json.dumps(meta, sort_keys=True)})
    atomic_write_bytes(Path(root) / entry["file"], data)
    return {"file": entry["file"], "seeds": entry["seeds"], "count": entry["count"],
            "sha256": hashlib.sha256(data).hexdigest()}


def file_sha256(path: str | os.PathLike, block: int = 1 << 24) -> str:
    """sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _read_header(path: Path) -> tuple[dict, int, int]:
    """The safetensors header of ``path``, where its data starts, and the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise PairDataError(f"{path}: truncated ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 1 << 24):
            raise PairDataError(f"{path}: corrupt safetensors header (length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PairDataError(f"{path}: corrupt safetensors header ({e})") from None
    return header, 8 + n, size


def _check_layout(path: Path, manifest: dict, index: int) -> tuple[dict, int]:
    """Checks a shard's header against the manifest; returns {name: (dtype, shape, begin, end)} and the data start."""
    settings, entry = manifest["settings"], manifest["shards"][index]
    header, start, size = _read_header(path)
    meta = json.loads((header.pop("__metadata__", None) or {}).get(FORMAT, "{}"))
    if meta.get("seeds") != entry["seeds"] or meta.get("settings_sha256") != settings_fingerprint(settings):
        raise PairDataError(f"{path}: belongs to another data set or shard (metadata seeds {meta.get('seeds')!r}, "
                            f"expected {entry['seeds']!r})")
    spec = settings["tensors"]
    if set(header) != set(spec):
        raise PairDataError(f"{path}: tensors {sorted(header)}, expected {sorted(spec)}")
    layout, end_max = {}, 0
    for name, info in header.items():
        dtype, shape = _ST_TO_NAME.get(info["dtype"]), [entry["count"], *spec[name]["shape"]]
        begin, end = info["data_offsets"]
        if dtype != spec[name]["dtype"] or info["shape"] != shape:
            raise PairDataError(f"{path}: tensor {name!r} is {info['dtype']} {info['shape']}, expected "
                                f"{spec[name]['dtype']} {shape}")
        if end - begin != math.prod(shape) * np.dtype(_DTYPES[dtype][1]).itemsize:
            raise PairDataError(f"{path}: tensor {name!r} has a wrong byte length")
        layout[name] = (dtype, shape, begin, end)
        end_max = max(end_max, end)
    if start + end_max != size:
        raise PairDataError(f"{path}: {size} bytes, the header describes {start + end_max} (truncated or padded)")
    return layout, start


def _inspect(root: str | os.PathLike, manifest: dict, index: int, checksum: bool) -> tuple[str | None, tuple]:
    """(problem or None, the layout from _check_layout when the layout is good)."""
    entry = manifest["shards"][index]
    path = Path(root) / entry["file"]
    if entry["sha256"] is None:
        return "not written yet (the data set is incomplete)", ()
    if not path.is_file():
        return "missing", ()
    try:
        layout, start = _check_layout(path, manifest, index)
    except (PairDataError, KeyError, TypeError, ValueError, AttributeError) as e:
        return str(e).removeprefix(f"{path}: "), ()
    if checksum:
        digest = file_sha256(path)
        if digest != entry["sha256"]:
            return f"sha256 {digest[:16]}... differs from the manifest's {entry['sha256'][:16]}... (corrupt)", ()
    else:
        _, _, begin, end = layout["seed"]
        seeds = np.fromfile(path, dtype=np.int64, count=(end - begin) // 8, offset=start + begin)
        if format_seeds(seeds.tolist()) != entry["seeds"]:
            return f"holds seeds {format_seeds(seeds.tolist())}, expected {entry['seeds']} (corrupt)", ()
    return None, (layout, start)


def check_shard(root: str | os.PathLike, manifest: dict, index: int, checksum: bool = True) -> str | None:
    """What is wrong with shard ``index`` (None if nothing): missing, not written yet, bad layout, seeds, sha256.

    Args:
        checksum: compare the file's sha256 with the manifest (reads the whole file); else check the header and the
            seed tensor only.
    """
    return _inspect(root, manifest, index, checksum)[0]


def verify(root: str | os.PathLike, manifest: dict | None = None, indices: Sequence[int] | None = None,
           checksum: bool = True) -> dict[str, str]:
    """Checks shards against the manifest; returns {shard file: problem} for each bad one (empty if all good)."""
    manifest = read_manifest(root) if manifest is None else manifest
    indices = range(len(manifest["shards"])) if indices is None else indices
    bad = {}
    for k in indices:
        problem = check_shard(root, manifest, k, checksum)
        if problem is not None:
            bad[manifest["shards"][k]["file"]] = problem
    return bad


# ----------------------------------------------------------------------------------------------------------------
# Reading pairs.


class PairDataset(torch.utils.data.Dataset):
    """The pairs of a folder, memory-mapped shard by shard (never loaded whole into RAM).

    ``ds[i]`` is {'noise': (C, R, R) float32, 'image': (C, R, R) float32, 'seed': int64 scalar tensor, 'label': int64
    scalar tensor (conditional only)}; pair i is the i-th seed of the manifest's seed list. ``ds.get_batch(indices)``
    returns the same keys batched (one fancy-indexed read per shard); DataLoader uses it through ``__getitems__``.

    ``ds.settings`` is the folder's :class:`PairSettings` (label policy, generator device, sampler, teacher).

    Args:
        root: the pair folder (with manifest.json).
        verify: also check every shard's sha256 against the manifest (reads everything once).

    Raises:
        PairDataError: the data set is incomplete, or a shard is missing or corrupt (the message names the file).
    """

    def __init__(self, root: str | os.PathLike, verify: bool = False):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.settings = PairSettings.from_dict(self.manifest["settings"])
        if not self.manifest["complete"]:
            done = sum(s["sha256"] is not None for s in self.manifest["shards"])
            raise PairDataError(f"{self.root / MANIFEST_NAME}: the data set is incomplete ({done} of "
                                f"{len(self.manifest['shards'])} shards written); rerun data_gen/generate.py with the "
                                f"same settings to finish it")
        self._layouts = []
        for k, entry in enumerate(self.manifest["shards"]):
            problem, layout = _inspect(self.root, self.manifest, k, checksum=verify)
            if problem is not None:
                raise PairDataError(f"{self.root / entry['file']}: {problem}; rerun data_gen/generate.py with the "
                                    f"same settings to regenerate it")
            self._layouts.append(layout)
        self._starts = np.cumsum([0] + [entry["count"] for entry in self.manifest["shards"]])  # (num_shards + 1,)
        spec = self.settings.tensors
        self.channels, self.resolution = spec["noise"]["shape"][0], spec["noise"]["shape"][1]
        self.conditional = "label" in spec
        self.label_dim = self.settings.label_dim if self.conditional else 0
        self.teacher = self.settings.teacher
        self._maps: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = {}  # memory maps are reopened in each worker process
        return state

    def _arrays(self, k: int) -> dict[str, np.ndarray]:
        if k not in self._maps:
            raw = np.memmap(self.root / self.manifest["shards"][k]["file"], dtype=np.uint8, mode="r")
            layout, start = self._layouts[k]
            self._maps[k] = {name: raw[start + begin:start + end].view(_DTYPES[dtype][1]).reshape(shape)
                             for name, (dtype, shape, begin, end) in layout.items()}
        return self._maps[k]

    def _locate(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row in shard) of each pair index, (B,) each."""
        idx, n = np.asarray(indices, dtype=np.int64).reshape(-1), len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"pair index out of range for {n} pairs: {idx[(idx < -n) | (idx >= n)][:4].tolist()}")
        idx = idx % n
        shard = np.searchsorted(self._starts, idx, side="right") - 1
        return shard, idx - self._starts[shard]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {key: value[0] for key, value in self.get_batch([i]).items()}

    def get_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Pairs ``indices`` stacked: noise/image (B, C, R, R) float32, seed (B,) and label (B,) int64."""
        shard, row = self._locate(indices)
        keys = ["noise", "image", "seed"] + (["label"] if self.conditional else [])
        shape = (len(shard), self.channels, self.resolution, self.resolution)
        out = {"noise": np.empty(shape, np.float32), "image": np.empty(shape, np.float32),
               "seed": np.empty(len(shard), np.int64), "label": np.empty(len(shard), np.int64)}
        for k in np.unique(shard):
            sel = np.nonzero(shard == k)[0]
            arrays = self._arrays(int(k))
            for key in keys:
                out[key][sel] = arrays[key][row[sel]]  # one fancy-indexed read per shard and tensor
        return {key: torch.from_numpy(out[key]) for key in keys}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        batch = self.get_batch(indices)
        return [{key: value[b] for key, value in batch.items()} for b in range(len(indices))]


class EpochSampler(torch.utils.data.Sampler):
    """Each rank's disjoint slice of one global random permutation per epoch, with exact resume.

    Epoch e's permutation of range(n) comes from (seed, e) only. With drop_last the permutation is cut to
    ``(n // world_size) * world_size`` entries; rank r takes entries r, r + W, r + 2W, ... so the global batch of step
    t (all ranks together) is a contiguous run of the permutation, whatever W is.

    Resume: ``position`` counts this rank's samples of the current epoch that training has consumed; the trainer calls
    ``advance(local_batch_size)`` after each step (a DataLoader runs ahead of training, so the sampler cannot know), and
    saves ``state_dict()``. After ``load_state_dict`` iteration restarts at that position; ``set_epoch`` with the same
    epoch keeps it, a new epoch starts at 0.

    Args:
        n: data set size.
        rank, world_size: this rank and the number of ranks.
        seed: permutation seed (the same on every rank).
        drop_last: cut the tail so every rank has n // world_size samples (else ranks differ by at most one).
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0, drop_last: bool = True):
        if n < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"EpochSampler: need n >= 1 and 0 <= rank < world_size, got n={n}, rank={rank}, "
                             f"world_size={world_size}")
        if drop_last and n < world_size:
            raise ValueError(f"EpochSampler: {n} samples cannot give each of {world_size} ranks one")
        self.n, self.rank, self.world_size, self.seed, self.drop_last = n, rank, world_size, seed, drop_last
        self.epoch, self.position = 0, 0

    def permutation(self, epoch: int) -> np.ndarray:
        """The global permutation of epoch ``epoch``, (n,) int64."""
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch]))).permutation(self.n)

    @property
    def num_samples(self) -> int:
        """This rank's samples per epoch."""
        total = (self.n // self.world_size) * self.world_size if self.drop_last else self.n
        return len(range(self.rank, total, self.world_size))

    def indices(self) -> np.ndarray:
        """This rank's indices of the current epoch, in order (all of them, regardless of position)."""
        perm = self.permutation(self.epoch)
        total = (self.n // self.world_size) * self.world_size if self.drop_last else self.n
        return perm[self.rank:total:self.world_size]

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch; a different epoch than the current one starts at position 0."""
        if epoch != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def advance(self, num_samples: int) -> None:
        """Marks ``num_samples`` more of this rank's samples as consumed by training."""
        if num_samples < 0 or self.position + num_samples > self.num_samples:
            raise ValueError(f"EpochSampler.advance({num_samples}) at position {self.position} passes the epoch's "
                             f"{self.num_samples} samples")
        self.position += num_samples

    def __len__(self) -> int:
        return self.num_samples - self.position

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.position:].tolist())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "n": self.n, "seed": self.seed,
                "world_size": self.world_size, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Restores epoch and position; a different world size is accepted when the samples consumed so far by all
        ranks together split evenly over the new ranks (then the continuation is exact)."""
        for key in ("n", "seed", "drop_last"):
            if state[key] != getattr(self, key):
                raise ValueError(f"EpochSampler.load_state_dict: {key} was {state[key]!r}, now {getattr(self, key)!r}")
        consumed = state["position"] * state["world_size"]
        if state["world_size"] != self.world_size and (not self.drop_last or consumed % self.world_size):
            raise ValueError(f"EpochSampler.load_state_dict: {consumed} samples consumed by {state['world_size']} "
                             f"ranks cannot be continued exactly by {self.world_size} ranks")
        self.epoch, self.position = int(state["epoch"]), consumed // self.world_size
        if self.position > self.num_samples:
            raise ValueError(f"EpochSampler.load_state_dict: position {self.position} beyond the epoch's "
                             f"{self.num_samples} samples")


# ----------------------------------------------------------------------------------------------------------------
# The training data order.


def micro_batches(ds, sampler, micro_bs: int, device: torch.device):
    """Endless micro-batches of this rank's slice of each epoch's permutation, from the sampler's position on.

    The sampler's position advances as batches are handed out (nothing runs ahead), so its state_dict() is exactly
    what training consumed. An epoch's last partial micro-batch is dropped.

    Args:
        ds: a :class:`PairDataset` (anything with ``get_batch(indices) -> dict of tensors``).
        sampler: its :class:`EpochSampler`; save ``sampler.state_dict()`` in checkpoints for exact resume.
        micro_bs: samples per micro-batch on this rank.
        device: where the batches go.
    """
    while True:
        indices = sampler.indices()  # (n // world,) this rank's slice of the epoch's global permutation
        while sampler.position + micro_bs <= len(indices):
            batch = ds.get_batch(indices[sampler.position:sampler.position + micro_bs])
            sampler.advance(micro_bs)
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        sampler.set_epoch(sampler.epoch + 1)
