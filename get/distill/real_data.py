"""Real-data sources: batches of real images for distillation methods that read real data (DMD2's discriminator).

Every source satisfies :class:`RealSource`: ``sample(batch_size)`` returns images (B, C, R, R) float32 (decoded
uint8 files map to [-1, 1] as EDM's x / 127.5 - 1) and int64 labels (B,) for a conditional teacher (None for an
unconditional one); ``state_dict()`` / ``load_state_dict()`` continue the stream exactly after a resume. Streams are
fixed by ``seed``: file sources read each rank's slice of one random permutation per epoch (get.data.EpochSampler,
disjoint across ``rank`` / ``world_size``); the analytic teacher's source draws batch k from a generator seeded with
(seed, rank, k).

Sources (:func:`make_real_source` picks one from a string):

* :class:`TeacherSamples` ('teacher' / 'exact'): exact samples of a teacher with a ``sample`` method (the analytic
  :class:`get.teachers.MixtureTeacher`); the default for it.
* :class:`PairImages` ('pairs'): the teacher images of a pair folder (data_gen output).
* :class:`NpzImages` (a ``.npz`` path): EDM's / clean-fid's format, key ``arr_0`` (N, H, W, C) uint8, labels under
  ``labels`` (or ``arr_1``); read with ``allow_pickle=False`` after checking the headers.
* :class:`PngFolder` (a folder of PNGs): EDM's dataset_tool layout, labels from ``dataset.json``
  (``{"labels": [["00000/img00000000.png", 6], ...]}``); images are decoded per batch.
* :class:`Cifar10Binary` (a ``cifar-10-batches-bin`` folder): the CIFAR-10 binary release, memory-mapped records of
  1 label byte + 3072 image bytes (CHW); the pickled Python release is refused (unpickling runs code).

Every file is checked against the teacher (channels, resolution, labels in [0, label_dim)) and sizes read from a
file are checked against the file's own size before anything is allocated; problems raise :class:`RealDataError`
naming the file.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from get.data import EpochSampler, PairDataset
from get.seeds import derived_seed

__all__ = ["RealDataError", "RealSource", "TeacherSamples", "PairImages", "NpzImages", "PngFolder", "Cifar10Binary",
           "make_real_source", "default_real_spec", "REAL_SPECS"]

REAL_SPECS = ("teacher", "exact", "pairs")  # the named specs; anything else is a path
CIFAR_RECORD = 1 + 3 * 32 * 32  # bytes per record of the CIFAR-10 binary release: label, then CHW image
CIFAR_FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}


class RealDataError(ValueError):
    """A real-data file or folder that cannot be used; the message names it and the problem."""


@runtime_checkable
class RealSource(Protocol):
    """A reproducible, resumable stream of real images.

    Attributes:
        channels, resolution: image shape (C, R, R).
        label_dim: classes of the labels it returns (0: it returns None).
    """

    channels: int
    resolution: int
    label_dim: int

    def sample(self, batch_size: int, device: torch.device | str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next batch: images (B, C, R, R) float32, labels (B,) int64 or None."""
        ...

    def state_dict(self) -> dict:
        """The position in the stream (small, JSON-able)."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Continues from a ``state_dict`` of a source built with the same arguments."""
        ...


def _teacher_name(teacher) -> str:
    return getattr(teacher, "name", type(teacher).__name__)


def _device_of(teacher) -> torch.device:
    """Where a teacher's tensors live (CPU for one without any)."""
    tensors = [*teacher.buffers(), *teacher.parameters()] if isinstance(teacher, torch.nn.Module) else []
    return tensors[0].device if tensors else torch.device("cpu")


def _check_labels(labels: np.ndarray, label_dim: int, where: str) -> None:
    """Labels (N,) must be integers in [0, label_dim)."""
    if labels.dtype.kind not in "iu":
        raise RealDataError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= label_dim):
        bad = labels[(labels < 0) | (labels >= label_dim)]
        raise RealDataError(f"{where}: labels must lie in [0, {label_dim}) for the teacher's {label_dim} classes, "
                            f"found {bad[:4].tolist()}")


# ----------------------------------------------------------------------------------------------------------------
# The analytic teacher's exact samples.


class TeacherSamples:
    """Exact samples of a teacher that has ``sample(n, generator)`` (:class:`get.teachers.MixtureTeacher`).

    Samples are not clipped to [-1, 1]: they are the teacher's distribution itself. A conditional teacher's labels are
    those of the sampled components (the exact joint distribution of images and classes).

    Args:
        teacher: the teacher.
        seed: fixes the stream; batch k of this rank is drawn from a generator seeded with (seed, rank, k).
        rank: this rank (ranks draw independent streams).
    """

    def __init__(self, teacher, seed: int = 0, rank: int = 0):
        if not callable(getattr(teacher, "sample", None)):
            raise RealDataError(f"teacher {_teacher_name(teacher)} has no exact sampler (sample method); give real "
                                f"data instead: a .npz, a folder of PNGs, a cifar-10-batches-bin folder or 'pairs'")
        self.teacher, self.seed, self.rank, self.batches = teacher, int(seed), int(rank), 0
        self.channels, self.resolution, self.label_dim = teacher.channels, teacher.resolution, teacher.label_dim

    def sample(self, batch_size, device=None):
        home = _device_of(self.teacher)  # the generator must live where the teacher samples
        generator = torch.Generator(home).manual_seed(derived_seed(self.seed, self.rank, self.batches))
        x, labels = self.teacher.sample(batch_size, generator=generator)  # (B, C, R, R) float64, (B,) int64
        self.batches += 1
        device = home if device is None else device
        return x.to(device, torch.float32), labels.to(device) if self.label_dim else None

    def state_dict(self):
        return {"kind": type(self).__name__, "seed": self.seed, "rank": self.rank, "batches": self.batches}

    def load_state_dict(self, state):
        mine = self.state_dict()
        for key in ("kind", "seed", "rank"):
            if state.get(key) != mine[key]:
                raise ValueError(f"{type(self).__name__}.load_state_dict: {key} was {state.get(key)!r}, "
                                 f"now {mine[key]!r}")
        self.batches = int(state["batches"])


# ----------------------------------------------------------------------------------------------------------------
# Indexed data sets: one permutation per epoch, read by index.


class _IndexedSource:
    """Shared stream of the file sources: this rank's slice of an EpochSampler permutation, across epochs.

    Subclasses set ``where`` (the file or folder, for messages) and implement ``_read(indices)`` -> (images (B, C, R,
    R) float32 in [-1, 1], labels (B,) int64 or None).
    """

    where: str

    def __init__(self, size: int, teacher, seed: int, rank: int, world_size: int):
        if size < world_size:
            raise RealDataError(f"{self.where}: {size} images cannot give each of {world_size} ranks one")
        self.channels, self.resolution, self.label_dim = teacher.channels, teacher.resolution, teacher.label_dim
        self.size = size
        self.sampler = EpochSampler(size, rank, world_size, seed, drop_last=True)
        self._epoch_indices = (None, None)  # (epoch, its indices): the permutation is computed once per epoch

    def _indices(self, batch_size: int) -> np.ndarray:
        """The next batch_size indices of this rank's stream, (B,) int64, continuing into the next epoch."""
        out = []
        while batch_size > 0:
            if self.sampler.position == self.sampler.num_samples:
                self.sampler.set_epoch(self.sampler.epoch + 1)
            if self._epoch_indices[0] != self.sampler.epoch:
                self._epoch_indices = (self.sampler.epoch, self.sampler.indices())
            take = min(batch_size, self.sampler.num_samples - self.sampler.position)
            out.append(self._epoch_indices[1][self.sampler.position:self.sampler.position + take])
            self.sampler.advance(take)
            batch_size -= take
        return np.concatenate(out)

    def sample(self, batch_size, device=None):
        images, labels = self._read(self._indices(batch_size))
        return images.to(device), None if labels is None else labels.to(device)

    def _read(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def state_dict(self):
        return {"kind": type(self).__name__, "size": self.size, "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state):
        if state.get("kind") != type(self).__name__ or state.get("size") != self.size:
            raise ValueError(f"{type(self).__name__}.load_state_dict: the state is of a {state.get('kind')} of "
                             f"{state.get('size')} images, this is one of {self.size} ({self.where})")
        self.sampler.load_state_dict(state["sampler"])


def _from_uint8(images: np.ndarray, labels: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 (B, C, R, R) -> float32 in [-1, 1] (EDM's x / 127.5 - 1); labels -> int64 tensor."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32) / 127.5 - 1  # (B, C, R, R)
    return x, None if labels is None else torch.from_numpy(labels.astype(np.int64))


class PairImages(_IndexedSource):
    """The teacher images of a pair folder (get.data.PairDataset), as real data.

    Args:
        pairs: the pair folder or an open PairDataset.
        teacher: the teacher the images must fit (channels, resolution, label_dim).
        seed, rank, world_size: the stream (see the module docstring).
    """

    def __init__(self, pairs: PairDataset | str | Path, teacher, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.pairs = pairs if isinstance(pairs, PairDataset) else PairDataset(pairs)
        self.where = str(self.pairs.root)
        shape, want = (self.pairs.channels, self.pairs.resolution), (teacher.channels, teacher.resolution)
        if shape != want:
            raise RealDataError(f"{self.where}: pairs of {shape[0]} channels x {shape[1]} pixels, teacher "
                                f"{_teacher_name(teacher)} has {want[0]} x {want[1]}")
        if teacher.label_dim and self.pairs.label_dim != teacher.label_dim:
            raise RealDataError(f"{self.where}: pairs with {self.pairs.label_dim} classes, teacher "
                                f"{_teacher_name(teacher)} has {teacher.label_dim}")
        super().__init__(len(self.pairs), teacher, seed, rank, world_size)

    def _read(self, indices):
        batch = self.pairs.get_batch(indices)
        return batch["image"], batch["label"] if self.label_dim else None


# ----------------------------------------------------------------------------------------------------------------
# .npz (EDM / clean-fid).


def _npy_header(zf: zipfile.ZipFile, member: str, where: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data bytes available) of an .npy member, from its header only."""
    info = zf.getinfo(member)
    with zf.open(member) as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, _, dtype = read_header(f)
        except ValueError as e:
            raise RealDataError(f"{where}: {member} has no valid .npy header ({e})") from None
        return shape, dtype, info.file_size - f.tell()


class NpzImages(_IndexedSource):
    """Images of an ``.npz`` in EDM's / clean-fid's format: ``arr_0`` (N, H, W, C) uint8, loaded into memory.

    Args:
        path: the .npz file.
        teacher: the teacher the images must fit (H = W = resolution, C = channels, labels for a conditional one).
        labels_key: the labels' key, (N,) integers; default ``labels``, else ``arr_1``, when present.
        seed, rank, world_size: the stream (see the module docstring).
    """

    def __init__(self, path: str | Path, teacher, labels_key: str | None = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.where = str(path)
        R, C = teacher.resolution, teacher.channels
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise RealDataError(f"{path}: not a readable .npz (zip) file ({e})") from None
        with zf:
            keys = [name[:-4] for name in zf.namelist() if name.endswith(".npy")]
            if "arr_0" not in keys:
                raise RealDataError(f"{path}: no images under key 'arr_0' (keys: {keys})")
            shape, dtype, available = _npy_header(zf, "arr_0.npy", self.where)
            if dtype != np.uint8 or len(shape) != 4:
                raise RealDataError(f"{path}: arr_0 must be uint8 images (N, H, W, C), got {dtype} {shape}")
            if shape[0] < 1 or shape[1:] != (R, R, C):
                raise RealDataError(f"{path}: arr_0 has {shape[0]} images of (H, W, C) {shape[1:]}; teacher "
                                    f"{_teacher_name(teacher)} needs at least one of {(R, R, C)}")
            if math.prod(shape) > available:  # python ints: a crafted N cannot overflow
                raise RealDataError(f"{path}: arr_0's header claims {shape} = {math.prod(shape)} bytes but the "
                                    f"member holds {available}: truncated or corrupt")
            if labels_key is None:
                labels_key = next((k for k in ("labels", "arr_1") if k in keys), None)
            elif labels_key not in keys:
                raise RealDataError(f"{path}: no labels under key {labels_key!r} (keys: {keys})")
            if labels_key is None and teacher.label_dim:
                raise RealDataError(f"{path}: no labels ('labels' or 'arr_1'), but teacher {_teacher_name(teacher)} "
                                    f"is conditional ({teacher.label_dim} classes)")
            if labels_key is not None and teacher.label_dim:
                lshape, ldtype, lavailable = _npy_header(zf, f"{labels_key}.npy", self.where)
                if lshape != (shape[0],) or ldtype.kind not in "iu" or shape[0] * ldtype.itemsize > lavailable:
                    raise RealDataError(f"{path}: labels {labels_key!r} must be ({shape[0]},) integers, got {ldtype} "
                                        f"{lshape} ({lavailable} bytes)")
        try:
            with np.load(path, allow_pickle=False) as npz:
                self.images = npz["arr_0"]  # (N, R, R, C) uint8
                self.labels = npz[labels_key] if labels_key is not None and teacher.label_dim else None  # (N,)
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise RealDataError(f"{path}: cannot be read ({e})") from None
        if self.labels is not None:
            _check_labels(self.labels, teacher.label_dim, f"{path} ({labels_key})")
        super().__init__(shape[0], teacher, seed, rank, world_size)

    def _read(self, indices):
        labels = None if self.labels is None else self.labels[indices]
        return _from_uint8(self.images[indices].transpose(0, 3, 1, 2), labels)  # NHWC -> NCHW


# ----------------------------------------------------------------------------------------------------------------
# A folder of PNGs (EDM's dataset_tool).


class PngFolder(_IndexedSource):
    """The ``.png`` files under a folder (recursively, sorted by relative path), decoded batch by batch.

    Labels come from ``dataset.json`` in EDM's dataset_tool format, ``{"labels": [["00000/img00000000.png", 6],
    ...]}`` (paths relative to the folder, with '/'); required for a conditional teacher. Every image must be R x R
    with mode 'RGB' (3 channels) or 'L' (1 channel); each is checked from its header before it is decoded.

    Args:
        root: the folder.
        teacher: the teacher the images must fit.
        seed, rank, world_size: the stream (see the module docstring).
    """

    MODES = {3: "RGB", 1: "L"}

    def __init__(self, root: str | Path, teacher, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.root, self.where = Path(root), str(root)
        if teacher.channels not in self.MODES:
            raise RealDataError(f"{root}: PNG images have 1 or 3 channels, teacher {_teacher_name(teacher)} has "
                                f"{teacher.channels}")
        self.files = sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
                            if p.suffix.lower() == ".png" and p.is_file())
        if not self.files:
            raise RealDataError(f"{root}: no .png files in this folder")
        self.labels = self._read_labels(teacher) if teacher.label_dim else None  # (N,) int64
        super().__init__(len(self.files), teacher, seed, rank, world_size)
        self._decode(self.files[0])  # fail fast on the first image

    def _read_labels(self, teacher) -> np.ndarray:
        path = self.root / "dataset.json"
        if not path.is_file():
            raise RealDataError(f"{path}: missing; teacher {_teacher_name(teacher)} is conditional "
                                f"({teacher.label_dim} classes) and needs the images' labels")
        try:
            entries = json.loads(path.read_text()).get("labels")
            table = None if entries is None else {str(name): label for name, label in entries}
        except (ValueError, TypeError, AttributeError) as e:
            raise RealDataError(f"{path}: not a dataset_tool label file {{\"labels\": [[file, label], ...]}} "
                                f"({e})") from None
        if table is None:
            raise RealDataError(f"{path}: has no labels (\"labels\" missing or null), teacher "
                                f"{_teacher_name(teacher)} is conditional ({teacher.label_dim} classes)")
        missing = [name for name in self.files if name not in table]
        if missing:
            raise RealDataError(f"{path}: no label for {len(missing)} of {len(self.files)} images, e.g. {missing[:3]}")
        if not all(isinstance(table[name], int) and not isinstance(table[name], bool) for name in self.files):
            raise RealDataError(f"{path}: labels must be integers")
        labels = np.array([table[name] for name in self.files], dtype=np.int64)
        _check_labels(labels, teacher.label_dim, str(path))
        return labels

    def _decode(self, name: str) -> np.ndarray:
        """One image (C, R, R) uint8, its size and mode checked before decoding."""
        path, mode = self.root / name, self.MODES[self.channels]
        try:
            with Image.open(path) as image:
                if image.format != "PNG" or image.size != (self.resolution, self.resolution) or image.mode != mode:
                    raise RealDataError(f"{path}: a {image.format} image of {image.size[0]}x{image.size[1]} pixels, "
                                        f"mode {image.mode}; the teacher needs a PNG of {self.resolution}x"
                                        f"{self.resolution}, mode {mode}")
                array = np.asarray(image)  # (R, R) or (R, R, 3) uint8
        except (OSError, Image.DecompressionBombError) as e:
            raise RealDataError(f"{path}: not a readable PNG ({e})") from None
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)

    def _read(self, indices):
        images = np.stack([self._decode(self.files[i]) for i in indices])  # (B, C, R, R) uint8
        return _from_uint8(images, None if self.labels is None else self.labels[indices])


# ----------------------------------------------------------------------------------------------------------------
# CIFAR-10, binary release.


def _is_cifar_python_release(folder: Path) -> bool:
    return folder.name == "cifar-10-batches-py" or (folder / "data_batch_1").is_file() or (
        folder / "cifar-10-batches-py").is_dir()


def _cifar_binary_folder(folder: Path) -> Path | None:
    """The folder holding the binary release's files: ``folder`` itself or its cifar-10-batches-bin child."""
    for candidate in (folder, folder / "cifar-10-batches-bin"):
        if any((candidate / name).is_file() for names in CIFAR_FILES.values() for name in names):
            return candidate
    return None


class Cifar10Binary(_IndexedSource):
    """CIFAR-10 from its binary release (``cifar-10-batches-bin``), memory-mapped and never unpickled.

    Each file is a sequence of 3073-byte records: the label byte (0-9), then the 32x32 image as 3072 bytes, red,
    green, blue planes (CHW).

    Args:
        root: the cifar-10-batches-bin folder (or its parent).
        teacher: the teacher (3 x 32 x 32; 10 classes or unconditional).
        split: 'train' (data_batch_1..5.bin, 50000 images) or 'test' (test_batch.bin, 10000).
        seed, rank, world_size: the stream (see the module docstring).
    """

    def __init__(self, root: str | Path, teacher, split: str = "train", seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        root = Path(root)
        self.where = str(root)
        if _is_cifar_python_release(root):
            raise RealDataError(f"{root}: this is CIFAR-10's pickled Python release, which is never unpickled here "
                                f"(unpickling can run code); download the binary release (cifar-10-binary.tar.gz) "
                                f"and pass its cifar-10-batches-bin folder")
        if split not in CIFAR_FILES:
            raise ValueError(f"Cifar10Binary: split must be one of {sorted(CIFAR_FILES)}, got {split!r}")
        if (teacher.channels, teacher.resolution) != (3, 32) or teacher.label_dim not in (0, 10):
            raise RealDataError(f"{root}: CIFAR-10 is 3 x 32 x 32 with 10 classes; teacher {_teacher_name(teacher)} "
                                f"has {teacher.channels} x {teacher.resolution} with {teacher.label_dim} classes")
        folder = _cifar_binary_folder(root) or root
        paths = [folder / name for name in CIFAR_FILES[split]]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise RealDataError(f"{folder}: missing {', '.join(missing)} of CIFAR-10's binary release ({split})")
        self.records = []
        for path in paths:
            size = path.stat().st_size
            if size == 0 or size % CIFAR_RECORD:
                raise RealDataError(f"{path}: {size} bytes is not a whole number of {CIFAR_RECORD}-byte records "
                                    f"(1 label byte + 3072 image bytes): truncated or not the binary release")
            self.records.append(np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, CIFAR_RECORD))  # (n, 3073)
        labels = np.concatenate([r[:, 0] for r in self.records])  # (N,) uint8
        _check_labels(labels, 10, str(folder))  # a label byte > 9 means the file is not CIFAR-10
        self.labels = labels.astype(np.int64) if teacher.label_dim else None
        self._starts = np.cumsum([0] + [len(r) for r in self.records])  # (files + 1,)
        super().__init__(len(labels), teacher, seed, rank, world_size)

    def _read(self, indices):
        file = np.searchsorted(self._starts, indices, side="right") - 1  # (B,)
        images = np.empty((len(indices), CIFAR_RECORD - 1), np.uint8)  # (B, 3072)
        for k in np.unique(file):
            sel = np.nonzero(file == k)[0]
            images[sel] = self.records[k][indices[sel] - self._starts[k], 1:]
        labels = None if self.labels is None else self.labels[indices]
        return _from_uint8(images.reshape(-1, 3, 32, 32), labels)


# ----------------------------------------------------------------------------------------------------------------
# Choosing a source.


def default_real_spec(teacher) -> str:
    """'teacher' when the teacher samples exactly (the analytic teacher), else 'pairs' (the pair set's images)."""
    return "teacher" if callable(getattr(teacher, "sample", None)) else "pairs"


def make_real_source(spec: str | Path | None, teacher, *, pairs: PairDataset | str | Path | None = None,
                     seed: int = 0, rank: int = 0, world_size: int = 1, split: str = "train",
                     labels_key: str | None = None) -> RealSource:
    """The real-data source a string names.

    Args:
        spec: 'teacher' / 'exact' (the teacher's exact samples), 'pairs' (the images of ``pairs``), a ``.npz`` file, a
            cifar-10-batches-bin folder (or its parent), or a folder of PNGs; None: :func:`default_real_spec`.
        teacher: the teacher the data must fit.
        pairs: the pair folder (or PairDataset), for 'pairs'.
        seed, rank, world_size: the stream (see the module docstring).
        split: CIFAR-10's 'train' or 'test' files.
        labels_key: the .npz labels key (default 'labels', else 'arr_1').
    """
    spec = default_real_spec(teacher) if spec is None else spec
    if spec in ("teacher", "exact"):
        return TeacherSamples(teacher, seed, rank)
    if spec == "pairs":
        if pairs is None:
            raise ValueError("real data 'pairs' needs the pair folder (pairs=...)")
        return PairImages(pairs, teacher, seed, rank, world_size)
    path = Path(spec)
    if path.is_file() and path.suffix == ".npz":
        return NpzImages(path, teacher, labels_key, seed, rank, world_size)
    if path.is_dir():
        if _is_cifar_python_release(path) or _cifar_binary_folder(path) is not None:
            return Cifar10Binary(path, teacher, split, seed, rank, world_size)
        return PngFolder(path, teacher, seed, rank, world_size)
    raise RealDataError(f"real data {str(spec)!r}: not one of {', '.join(REAL_SPECS)}, an existing .npz file or a "
                        f"folder (of PNGs, or CIFAR-10's cifar-10-batches-bin)")
