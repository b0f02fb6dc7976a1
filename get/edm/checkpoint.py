"""Official EDM checkpoints: names -> URLs and cache, a safe reader for their pickles (docs/EDM.md).

Cache. Official names (``OFFICIAL_CHECKPOINTS``) are downloaded once into ``<cache>/edm/<name>.pkl``, where
``<cache>`` is ``$GET_CACHE`` if set, else ``$XDG_CACHE_HOME/get``, else ``~/.cache/get``. To run offline, put the
file there yourself.

Safety. The official ``.pkl`` files are snapshots of ``torch_utils.persistence``: every network object carries the
full Python source of its defining module, which EDM's own loader ``exec``s. :func:`read_edm_pickle` never does: it
unpickles with an exact allowlist of globals (docs/EDM.md), turns every persistent object into an inert
:class:`EDMRecord` (the embedded source is only hashed), parses the nested storage blobs itself (sizes checked against
the bytes present before anything is allocated), rebuilds each tensor as a view checked to lie inside its storage
without overlaps, and refuses anything else with :class:`UnsafePickleError` naming the global, before importing or
calling it. :func:`load_edm` then builds *our* class from the recorded class name and constructor keywords (bounded,
on the meta device) and loads the weights strictly. docs/LOADERS.md lists what every loader accepts and refuses.
"""

from __future__ import annotations

import collections
import hashlib
import inspect
import io
import os
import pickle
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from tqdm import tqdm

from get.edm.networks import NETWORKS
from get.edm.precond import PRECONDITIONERS
from get.safety import check_int, check_number, strided_layout_error, total_bytes_error

__all__ = [
    "OFFICIAL_CHECKPOINTS", "cache_dir", "resolve_checkpoint", "download", "UnsafePickleError", "EDMRecord",
    "read_edm_pickle", "state_dict_from_record", "build_network", "load_edm", "load_state_dict_strict",
]

_CDN = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained"
_CONFIG_F = ["edm-cifar10-32x32-cond-vp", "edm-cifar10-32x32-cond-ve", "edm-cifar10-32x32-uncond-vp",
             "edm-cifar10-32x32-uncond-ve", "edm-ffhq-64x64-uncond-vp", "edm-ffhq-64x64-uncond-ve",
             "edm-afhqv2-64x64-uncond-vp", "edm-afhqv2-64x64-uncond-ve", "edm-imagenet-64x64-cond-adm"]
# Config-A baselines: the first three are named in EDM's README, the others only by third parties (unverified).
_CONFIG_A = ["baseline-cifar10-32x32-uncond-vp", "baseline-cifar10-32x32-uncond-ve", "baseline-imagenet-64x64-cond-adm",
             "baseline-cifar10-32x32-cond-vp", "baseline-cifar10-32x32-cond-ve", "baseline-ffhq-64x64-uncond-vp",
             "baseline-ffhq-64x64-uncond-ve", "baseline-afhqv2-64x64-uncond-vp", "baseline-afhqv2-64x64-uncond-ve"]
OFFICIAL_CHECKPOINTS: dict[str, str] = {
    **{name: f"{_CDN}/{name}.pkl" for name in _CONFIG_F},
    **{name: f"{_CDN}/baseline/{name}.pkl" for name in _CONFIG_A},
}

CACHE_ENV = "GET_CACHE"


def cache_dir() -> Path:
    """``$GET_CACHE``, else ``$XDG_CACHE_HOME/get``, else ``~/.cache/get``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "get"


def download(url: str, dest: str | Path, progress: bool = True) -> Path:
    """Downloads ``url`` to ``dest`` atomically (temporary file in the same folder, fsync, rename) with a progress bar.

    Raises:
        FileNotFoundError: when the download fails (e.g. offline); the message says where to put the file instead.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}",
                      disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
        if total is not None and tmp.stat().st_size != total:
            raise OSError(f"truncated download: got {tmp.stat().st_size} of {total} bytes")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"could not download {url} ({e}). If this machine is offline, download the file elsewhere and put it at "
            f"{dest} (the cache folder is {dest.parent}; set ${CACHE_ENV} to use another folder).") from e
    return dest


def resolve_checkpoint(path_or_name: str | Path, base_url: str | None = None, progress: bool = True) -> Path:
    """A local path as is; an official name -> its cached file, downloaded on first use.

    Args:
        path_or_name: a file path or a key of ``OFFICIAL_CHECKPOINTS`` (a trailing '.pkl' is accepted).
        base_url: replaces the official URL's folder (a mirror, e.g. 'file:///data/edm' or 'https://host/edm').
        progress: show a download progress bar.
    """
    name = str(path_or_name)
    key = name[:-4] if name.endswith(".pkl") else name
    if key in OFFICIAL_CHECKPOINTS and not Path(name).is_file():
        dest = cache_dir() / "edm" / f"{key}.pkl"
        if not dest.is_file():
            url = OFFICIAL_CHECKPOINTS[key] if base_url is None else f"{base_url.rstrip('/')}/{key}.pkl"
            download(url, dest, progress=progress)
        return dest
    path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{name!r} is neither an existing file nor an official EDM checkpoint name "
                                f"({', '.join(OFFICIAL_CHECKPOINTS)})")
    return path


# ------------------------------------------------------------------------------------------------------------------
# The restricted unpickler.


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for something outside the allowlist, or its content is not a well-formed EDM snapshot."""


KNOWN_CLASSES = frozenset({
    "EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond", "SongUNet", "DhariwalUNet", "UNetBlock", "Conv2d",
    "GroupNorm", "Linear", "PositionalEmbedding", "FourierEmbedding", "EDMLoss", "VPLoss", "VELoss", "AugmentPipe",
})
_META_FIELDS = frozenset({"type", "version", "module_src", "class_name", "state"})


class EDMRecord:
    """Inert stand-in for a persistent EDM object: its class name, its ``__dict__`` and the hash of its source."""

    __slots__ = ("class_name", "state", "module_src_sha256")

    def __init__(self, class_name: str, state: dict, module_src_sha256: str):
        object.__setattr__(self, "class_name", class_name)
        object.__setattr__(self, "state", state)
        object.__setattr__(self, "module_src_sha256", module_src_sha256)

    def __setattr__(self, key, value):
        raise UnsafePickleError(f"pickle tries to set attribute {key!r} on a {self.class_name} record")

    def __setstate__(self, state):
        raise UnsafePickleError(f"pickle tries to modify a {self.class_name} record")

    def __repr__(self):
        return f"EDMRecord({self.class_name}, src sha256 {self.module_src_sha256[:12]})"


class _ModuleDictStub:
    """Inert stand-in for ``torch.nn.ModuleDict`` (rebuilt by NEWOBJ + BUILD): keeps the BUILD state."""

    def __setstate__(self, state):
        if "state" in self.__dict__ or not isinstance(state, dict):
            raise UnsafePickleError("malformed torch.nn.ModuleDict in pickle")
        self.__dict__["state"] = state


class _Frozen:
    """Wraps an allowed function so a pickle cannot modify it (BUILD/setattr) or reach its attributes."""

    __slots__ = ("_fn", "_qualname")

    def __init__(self, fn, qualname: str):
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_qualname", qualname)

    def __call__(self, *args):
        return self._fn(*args)

    def __setattr__(self, key, value):
        raise UnsafePickleError(f"pickle tries to set attribute {key!r} of {self._qualname}")

    def __setstate__(self, state):
        raise UnsafePickleError(f"pickle tries to modify {self._qualname}")


def _reconstruct_persistent_obj(meta):
    """Replacement for ``torch_utils.persistence._reconstruct_persistent_obj``: validates and records, never executes
    ``module_src``."""
    if not isinstance(meta, dict) or set(meta) != _META_FIELDS:
        keys = sorted(map(repr, meta)) if isinstance(meta, dict) else type(meta).__name__
        raise UnsafePickleError(f"persistent object meta must have exactly the fields {sorted(_META_FIELDS)}, "
                                f"got {keys}")
    if meta["type"] != "class" or meta["version"] != 6:
        raise UnsafePickleError(f"persistent object has type={meta['type']!r} version={meta['version']!r}; "
                                f"expected 'class' and 6")
    if not isinstance(meta["class_name"], str) or meta["class_name"] not in KNOWN_CLASSES:
        raise UnsafePickleError(f"persistent object of unknown class {meta['class_name']!r}; "
                                f"known: {sorted(KNOWN_CLASSES)}")
    if not isinstance(meta["module_src"], str) or not isinstance(meta["state"], dict):
        raise UnsafePickleError(f"persistent {meta['class_name']}: module_src must be a string and state a dict")
    src_hash = hashlib.sha256(meta["module_src"].encode("utf-8", "surrogatepass")).hexdigest()
    return EDMRecord(meta["class_name"], meta["state"], src_hash)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a legacy (non-zip) torch.save blob
_STORAGE_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16}  # network weights are floating point


class _Storage:
    """Inert, fixed-size storage read from a nested blob: ``flat`` is a 1-D tensor over exactly its bytes."""

    __slots__ = ("flat",)

    def __init__(self, flat: torch.Tensor):
        object.__setattr__(self, "flat", flat)

    def __setattr__(self, key, value):
        raise UnsafePickleError(f"pickle tries to set attribute {key!r} of a storage")

    def __setstate__(self, state):
        raise UnsafePickleError("pickle tries to modify a storage")


class _BlobUnpickler(pickle.Unpickler):
    """Reads the plain pickles of a legacy blob: its only globals are storage types (mapped to dtypes), its only
    persistent id is one storage record ('storage', type, key, location, numel, None)."""

    def __init__(self, file):
        super().__init__(file)
        self.records = []

    def find_class(self, module: str, name: str):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise UnsafePickleError(f"global '{module}.{name}' (storages of {sorted(_STORAGE_DTYPES)} only)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise UnsafePickleError(f"persistent id {type(pid).__name__} is not a storage record")
        _, dtype, key, location, numel, view = pid
        if (not isinstance(dtype, torch.dtype) or not isinstance(key, str) or not isinstance(location, str)
                or not isinstance(numel, int) or isinstance(numel, bool) or numel < 0 or view is not None):
            raise UnsafePickleError("malformed storage record")
        self.records.append((key, dtype, numel))
        return key


def _load_storage_from_bytes(data):
    """Replacement for ``torch.storage._load_from_bytes``: parses the nested legacy ``torch.save`` blob itself (magic,
    version, system info, one storage record, its key, then int64 element count and raw bytes) and checks that the
    bytes present are exactly what the record claims before allocating anything; torch never sees the blob."""
    if not isinstance(data, bytes):
        raise UnsafePickleError(f"storage blob must be bytes, got {type(data).__name__}")
    f = io.BytesIO(data)
    try:
        for expected in (_LEGACY_MAGIC, 1001):  # magic number, format version
            if _BlobUnpickler(f).load() != expected:
                raise UnsafePickleError("not a legacy torch.save blob (magic number or version)")
        sys_info = _BlobUnpickler(f).load()
        if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
            raise UnsafePickleError("system info missing or not little-endian")
        main = _BlobUnpickler(f)
        key = main.load()
        keys = _BlobUnpickler(f).load()
        if len(main.records) != 1 or keys != [key] or key != main.records[0][0]:
            raise UnsafePickleError("the blob must hold exactly one storage")
        _, dtype, numel = main.records[0]
        header = f.read(8)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(header) != 8 or int.from_bytes(header, "little", signed=True) != numel:
            raise UnsafePickleError(f"element count header does not match the record ({numel})")
        if len(data) - f.tell() != numel * itemsize:
            raise UnsafePickleError(f"record claims {numel} x {itemsize} bytes, the blob holds {len(data) - f.tell()}")
    except Exception as e:
        raise UnsafePickleError(f"refused nested storage blob: {e}") from e
    raw = bytearray(data[f.tell():])
    return _Storage(torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype))


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """``torch._utils._rebuild_tensor_v2`` as a checked view: it must lie inside its storage and not overlap itself
    (storages never grow); gradient flags and hooks are dropped."""
    if not isinstance(storage, _Storage):
        raise UnsafePickleError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
    if not isinstance(size, tuple) or not isinstance(stride, tuple):
        raise UnsafePickleError("tensor size and stride must be tuples")
    if metadata:
        raise UnsafePickleError("tensor metadata is not supported")
    error = strided_layout_error(size, stride, storage_offset, storage.flat.numel())
    if error:
        raise UnsafePickleError(f"tensor record refused: {error}")
    return storage.flat.as_strided(size, stride, storage_offset)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """``torch._utils._rebuild_parameter`` returning the plain tensor."""
    if type(data) is not torch.Tensor:
        raise UnsafePickleError(f"parameter rebuilt from a {type(data).__name__}, not a tensor")
    return data


def _numpy_scalar(dtype, data):
    """``numpy.core.multiarray.scalar`` restricted to numeric dtypes and raw bytes."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or dtype.fields is not None:
        raise UnsafePickleError(f"numpy scalar of dtype {dtype} refused (only numeric dtypes)")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UnsafePickleError(f"numpy scalar of dtype {dtype} needs {dtype.itemsize} raw bytes")
    return np.frombuffer(data, dtype=dtype)[0]


def _latin1_bytes(text, encoding):
    """``_codecs.encode`` only as protocol 2 uses it for bytes: a str encoded as latin-1."""
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafePickleError("_codecs.encode is allowed only as encode(str, 'latin1') (protocol-2 bytes)")
    return text.encode("latin1")


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"):
        _Frozen(_reconstruct_persistent_obj, "torch_utils.persistence._reconstruct_persistent_obj"),
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _Frozen(_rebuild_tensor, "torch._utils._rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"): _Frozen(_rebuild_parameter, "torch._utils._rebuild_parameter"),
    ("torch.storage", "_load_from_bytes"): _Frozen(_load_storage_from_bytes, "torch.storage._load_from_bytes"),
    ("torch.nn.modules.container", "ModuleDict"): _ModuleDictStub,
    ("numpy.core.multiarray", "scalar"): _Frozen(_numpy_scalar, "numpy.core.multiarray.scalar"),
    ("numpy._core.multiarray", "scalar"): _Frozen(_numpy_scalar, "numpy._core.multiarray.scalar"),
    ("numpy", "dtype"): np.dtype,
    # Protocol-3 writers encode sets (_non_persistent_buffers_set) as REDUCE of builtins.set; protocol 2 names it
    # '__builtin__.set' (Python 2 module names) and writes bytes as _codecs.encode(text, 'latin1').
    ("builtins", "set"): _Frozen(set, "builtins.set"),
    ("__builtin__", "set"): _Frozen(set, "__builtin__.set"),
    ("_codecs", "encode"): _Frozen(_latin1_bytes, "_codecs.encode"),
}


class _SafeEDMUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose globals come only from ``_ALLOWED_GLOBALS`` (nothing is ever imported)."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise UnsafePickleError(f"refused global '{module}.{name}': not in the EDM checkpoint allowlist "
                                    f"(the file is not an EDM snapshot or was tampered with)") from None


def read_edm_pickle(file: str | Path | BinaryIO) -> Any:
    """Unpickles an EDM snapshot safely; persistent objects come back as :class:`EDMRecord`.

    Raises:
        UnsafePickleError: on any global outside the allowlist or malformed persistent objects.
    """
    if isinstance(file, (str, Path)):
        with open(file, "rb") as f:
            try:
                return _SafeEDMUnpickler(f).load()
            except UnsafePickleError as e:
                raise UnsafePickleError(f"{file}: {e}") from None
    return _SafeEDMUnpickler(file).load()


# ------------------------------------------------------------------------------------------------------------------
# Records -> our networks.


MAX_DEPTH = 32  # EDM's module trees are 5 levels deep


def _children(state: dict, where: str) -> dict:
    modules = state.get("_modules", {})
    if not isinstance(modules, dict):
        raise UnsafePickleError(f"{where}: _modules is a {type(modules).__name__}, not a dict")
    return modules


def state_dict_from_record(record: EDMRecord | _ModuleDictStub, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flattens a record tree into a state dict: parameters, then persistent buffers, then children (torch's order).

    Raises:
        UnsafePickleError: malformed records, a module reached twice (a pickle can share one record along
            exponentially many paths; EDM networks share none) or nesting deeper than ``MAX_DEPTH``.
    """
    out: dict[str, torch.Tensor] = {}
    _collect(record, prefix, out, {}, 0)
    return out


def _collect(record, prefix: str, out: dict, seen: dict, depth: int) -> None:
    where = prefix.rstrip(".") or "<root>"
    if depth > MAX_DEPTH:
        raise UnsafePickleError(f"{where}: modules nested deeper than {MAX_DEPTH} levels")
    if isinstance(record, _ModuleDictStub):
        state = record.__dict__.get("state", {})
    elif isinstance(record, EDMRecord):
        state = record.state
    else:
        raise UnsafePickleError(f"{where}: expected a module, got {type(record).__name__}")
    if id(record) in seen:
        raise UnsafePickleError(f"{where}: the same module record also appears at {seen[id(record)]}")
    seen[id(record)] = where
    non_persistent = state.get("_non_persistent_buffers_set", set())
    if not isinstance(non_persistent, (set, frozenset)):
        raise UnsafePickleError(f"{where}: _non_persistent_buffers_set is a {type(non_persistent).__name__}")
    for group in ("_parameters", "_buffers"):
        tensors = state.get(group, {})
        if not isinstance(tensors, dict):
            raise UnsafePickleError(f"{where}: {group} is a {type(tensors).__name__}, not a dict")
        for name, tensor in tensors.items():
            if not isinstance(name, str):
                raise UnsafePickleError(f"{where}: {group} has a key of type {type(name).__name__}")
            if tensor is None or (group == "_buffers" and name in non_persistent):
                continue
            if type(tensor) is not torch.Tensor:
                raise UnsafePickleError(f"{where}.{name}: expected a tensor, got {type(tensor).__name__}")
            out[prefix + name] = tensor
    for name, child in _children(state, where).items():
        if not isinstance(name, str):
            raise UnsafePickleError(f"{where}: _modules has a key of type {type(name).__name__}")
        if child is not None:
            _collect(child, f"{prefix}{name}.", out, seen, depth + 1)


def _allowed_kwargs(class_name: str, model_type: str) -> set[str]:
    skip = {"self", "name", "model_kwargs", "img_resolution", "in_channels", "out_channels"}
    precond = set(inspect.signature(PRECONDITIONERS[class_name].__init__).parameters)
    network = set(inspect.signature(NETWORKS[model_type].__init__).parameters)
    return (precond | network) - skip | {"img_resolution"}


MAX_LIST = 16  # constructor lists (channel_mult, attn_resolutions, resample_filter) are short


def _plain(value: Any, key: str) -> Any:
    """numpy scalars -> Python numbers; flat lists of at most ``MAX_LIST`` scalars; anything else refused (so a
    crafted argument can neither nest deeply nor share references along exponentially many paths)."""
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_LIST:
            raise UnsafePickleError(f"constructor argument {key!r} has {len(value)} items (at most {MAX_LIST})")
        if any(isinstance(v, (list, tuple)) for v in value):
            raise UnsafePickleError(f"constructor argument {key!r} has nested lists")
        return [_plain(v, key) for v in value]
    raise UnsafePickleError(f"constructor argument {key!r} has unsupported type {type(value).__name__}")


# Bounds on the integer constructor arguments: generous beyond every official network, and small enough that
# building (on the meta device) and the shape comparison stay fast; sizes then must match the file's tensors.
_INT_BOUNDS = {"img_resolution": (1, 1024), "img_channels": (1, 64), "label_dim": (0, 100_000),
               "augment_dim": (0, 64), "model_channels": (1, 4096), "channel_mult_emb": (1, 16),
               "num_blocks": (1, 64), "channel_mult_noise": (1, 16), "M": (1, 10_000)}
_LIST_BOUNDS = {"channel_mult": (1, 64, 1, 8), "attn_resolutions": (1, 1024, 0, MAX_LIST),
                "resample_filter": (0, 1024, 1, MAX_LIST)}  # item bounds, length bounds
_STR_ARGS = {"model_type", "embedding_type", "encoder_type", "decoder_type"}


def check_constructor_kwargs(kwargs: dict, where: str) -> None:
    """Types and bounds of EDM constructor keywords (preconditioner + network), before anything is built.

    Raises:
        ValueError: naming ``where`` and the argument.
    """
    for key, value in kwargs.items():
        if key in _INT_BOUNDS:
            check_int(value, key, *_INT_BOUNDS[key], where)
        elif key in _LIST_BOUNDS:
            low, high, min_len, max_len = _LIST_BOUNDS[key]
            if not isinstance(value, (list, tuple)) or not min_len <= len(value) <= max_len:
                raise ValueError(f"{where}: {key} must be a list of {min_len} to {max_len} integers, got {value!r}")
            for v in value:
                check_int(v, key, low, high, where)
        elif key in _STR_ARGS:
            if not isinstance(value, str):
                raise ValueError(f"{where}: {key} must be a string, got {value!r}")
        elif key == "use_fp16":
            if not isinstance(value, bool):
                raise ValueError(f"{where}: use_fp16 must be a bool, got {value!r}")
        else:  # dropout, sigma_*, beta_*, epsilon_t, C_1, C_2, label_dropout
            check_number(value, key, where, allow_inf=key == "sigma_max")


def build_from_record(record: EDMRecord, where: str = "<pickle>"):
    """Our preconditioner from a top-level record's class name and validated ``_init_kwargs`` (weights not loaded)."""
    if not isinstance(record, EDMRecord) or record.class_name not in PRECONDITIONERS:
        got = record.class_name if isinstance(record, EDMRecord) else type(record).__name__
        raise UnsafePickleError(f"top-level network is {got!r}; expected one of {sorted(PRECONDITIONERS)}")
    state = record.state
    init_args = state.get("_init_args", ())
    if not isinstance(init_args, (tuple, list)) or init_args:
        raise UnsafePickleError(f"{record.class_name}: positional _init_args are not supported")
    init_kwargs = state.get("_init_kwargs")
    if not isinstance(init_kwargs, dict) or not all(isinstance(k, str) for k in init_kwargs):
        raise UnsafePickleError(f"{record.class_name}: _init_kwargs missing or not a dict with string keys")
    kwargs = {k: _plain(v, k) for k, v in init_kwargs.items()}
    return build_network(record.class_name, kwargs, f"{where}: {record.class_name}")


def build_network(class_name: str, kwargs: dict, where: str, name: str | None = None):
    """Checks the keywords, then builds the preconditioner on the meta device (shapes only, no memory)."""
    default_type = inspect.signature(PRECONDITIONERS[class_name].__init__).parameters["model_type"].default
    model_type = kwargs.get("model_type", default_type)
    if model_type not in NETWORKS:
        raise ValueError(f"{where}: unsupported architecture model_type={model_type!r}; "
                         f"supported: {sorted(NETWORKS)}")
    unknown = sorted(set(kwargs) - _allowed_kwargs(class_name, model_type))
    if unknown:
        raise ValueError(f"{where}({model_type}): unsupported constructor argument(s) {unknown}")
    check_constructor_kwargs(kwargs, where)
    with torch.device("meta"):  # no memory, no random init: the weights are assigned by load_state_dict_strict
        return PRECONDITIONERS[class_name](**kwargs, name=name)


def load_state_dict_strict(net: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> list[str]:
    """Strict load with a readable error; returns the keys that were converted to the expected dtype. Tensors are
    assigned (not copied), so ``net`` may have been built on the 'meta' device."""
    expected = net.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [f"{k}: {tuple(tensors[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
             if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{source}: weights do not match {type(net).__name__}: missing {missing[:5]} "
                         f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}), "
                         f"shape mismatches {wrong[:5]} ({len(wrong)})")
    converted = [k for k in expected if tensors[k].dtype != expected[k].dtype]
    net.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True, assign=True)
    return converted


def load_edm(path_or_name: str | Path, key: str = "ema", name: str | None = None, base_url: str | None = None):
    """Loads an official EDM snapshot (or any file in its format) safely into our network.

    Args:
        path_or_name: a ``.pkl`` path or an official name such as 'edm-cifar10-32x32-cond-vp' (downloaded and cached,
            see :func:`cache_dir`).
        key: entry of the snapshot dict holding the network ('ema' in EDM's snapshots).
        name: teacher name (default: the file name without '.pkl').
        base_url: mirror folder for official names (see :func:`resolve_checkpoint`).

    Returns:
        The preconditioner (EDMPrecond, ...) in eval mode with gradients off; ``teacher.source`` records the file,
        its sha256 and the sha256 of the embedded (never executed) source.

    Raises:
        UnsafePickleError: the pickle references anything outside the allowlist or is malformed.
        ValueError: unsupported architecture / constructor arguments, or weights that do not match strictly.
    """
    path = resolve_checkpoint(path_or_name, base_url=base_url)
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            sha.update(block)
    data = read_edm_pickle(path)
    if not isinstance(data, dict) or key not in data:
        got = sorted(k for k in data if isinstance(k, str)) if isinstance(data, dict) else type(data).__name__
        raise UnsafePickleError(f"{path}: expected a snapshot dict with key {key!r}, got {got}")
    record = data[key]
    try:
        net = build_from_record(record, str(path))  # its ValueErrors name the file already
        tensors = state_dict_from_record(record)
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    error = total_bytes_error(tensors.values(), path.stat().st_size)
    if error:
        raise UnsafePickleError(f"{path}: {error}")
    converted = load_state_dict_strict(net, tensors, str(path))
    net.name = name or path.name.removesuffix(".pkl")
    net.source = {"file": path.name, "sha256": sha.hexdigest(), "module_src_sha256": record.module_src_sha256,
                  "converted_dtypes": converted}
    return net.eval().requires_grad_(False)
