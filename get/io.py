"""Files the library writes: atomic writes (a file is complete under its final name or absent), JSON, safetensors,
and the weights hash recorded beside them (``tensors_sha256``).

Every file the library writes (weights, configs, manifests, shards, checkpoints) goes through these helpers:
write to a temporary name in the same folder, flush and fsync, then ``os.replace`` onto the final name.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as _safetensors_bytes


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (same-folder temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder entry is on disk.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, obj) -> None:
    """Writes ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike):
    """Reads a JSON file, naming the file in the error when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Saves tensors as a safetensors file, atomically. Tensors are made contiguous CPU copies."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = None if metadata is None else {str(k): str(v) for k, v in metadata.items()}
    atomic_write_bytes(path, _safetensors_bytes(tensors, metadata=meta))


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Saves arrays as an uncompressed .npz, atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def json_sha256(obj) -> str:
    """sha256 of the canonical JSON of plain JSON values (sorted keys): the identity of a config or manifest."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted name order."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
