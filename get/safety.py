"""Checks shared by the loaders of files that may be crafted (EDM pickles, official GET ``.pth``, our folders).

Each check runs on numbers read from a file before anything of that size is allocated, and returns or raises a
message that the caller prefixes with the file and key.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import torch

MAX_NDIM = 8  # real weights have at most 4 dimensions


def strided_layout_error(size, stride, offset: int, storage_numel: int) -> str | None:
    """Why a view (size, stride, offset) of a storage of ``storage_numel`` elements is refused, or None.

    Accepted: non-negative integers, as many strides as sizes, every element inside the storage, and no two
    elements at the same place (no zero strides or overlaps that would expand a small file into a large tensor).
    """
    ints = (offset, *size, *stride)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ints):
        return "offset, sizes and strides must be non-negative integers"
    if len(size) != len(stride) or len(size) > MAX_NDIM:
        return f"{len(size)} sizes and {len(stride)} strides (at most {MAX_NDIM} dimensions, as many of each)"
    if not isinstance(storage_numel, int) or storage_numel < 0:
        return f"storage size {storage_numel!r} is not a non-negative integer"
    if 0 in size:
        return None if offset <= storage_numel else f"offset {offset} past the storage ({storage_numel} elements)"
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage_numel:
        return (f"size {tuple(size)}, stride {tuple(stride)}, offset {offset} reach element {last}, past the "
                f"storage ({storage_numel} elements)")
    # Non-overlap: with the dimensions sorted by stride, each stride must step past every element the smaller
    # ones reach (this refuses stride 0 on a dimension of size > 1, and overlapping views).
    reach = 0
    for s, n in sorted((s, n) for n, s in zip(size, stride) if n > 1):
        if s <= reach:
            return f"size {tuple(size)}, stride {tuple(stride)} make elements overlap (zero or too small stride)"
        reach += (n - 1) * s
    return None


def tensor_layout_error(t: torch.Tensor) -> str | None:
    """``strided_layout_error`` for a loaded tensor and its storage."""
    numel = t.untyped_storage().nbytes() // t.element_size()
    return strided_layout_error(tuple(t.shape), tuple(t.stride()), t.storage_offset(), numel)


def total_bytes_error(tensors, file_size: int) -> str | None:
    """Refuses weights that hold more bytes than the file: views sharing one storage cannot multiply it."""
    total = sum(t.numel() * t.element_size() for t in tensors)
    if total > file_size:
        return f"the tensors hold {total} bytes, more than the {file_size} bytes of the file (shared storages?)"
    return None


def check_int(value, name: str, low: int, high: int, where: str) -> int:
    """An int in [low, high] (bools refused), else ValueError naming ``where`` and ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{where}: {name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def check_number(value, name: str, where: str, allow_inf: bool = False) -> float:
    """A finite int or float (inf when ``allow_inf``), else ValueError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if not ok or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{where}: {name} must be a finite number, got {value!r}")
    return value


def check_torch_zip(path: Path) -> None:
    """Before ``torch.load(path, weights_only=True)``: the zip format of ``torch.save`` with stored entries inside the
    file. The legacy format is refused: its loader allocates the storage sizes it reads before checking them."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a zip-format torch.save file (legacy .pth files are not supported)")
    size = path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if (info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size
                    or info.header_offset + info.file_size > size):
                raise ValueError(f"{path}: zip entry {info.filename!r} is compressed or reaches past the file's end")
