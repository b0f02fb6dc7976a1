"""Safe loading of EDM-format pickles (docs/EDM.md), official names -> cache, safetensors conversion.

The tests write EDM snapshots themselves, in the byte layout of ``torch_utils.persistence``: every network object
reduces to ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with meta = {type, version, module_src,
class_name, state}, ``enc``/``dec`` are real ``torch.nn.ModuleDict``s, tensors go through ``torch._utils`` and
``torch.storage._load_from_bytes`` (nested legacy blobs), numpy float64 scalars appear in nested ``_init_kwargs``.
"""

import collections
import contextlib
import hashlib
import io
import json
import pickle
import struct
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from get.edm import (
    EDMPrecond,
    UnsafePickleError,
    VEPrecond,
    VPPrecond,
    cache_dir,
    iDDPMPrecond,
    load_edm,
    read_edm_pickle,
)
from get.edm.checkpoint import KNOWN_CLASSES
from get.teachers import MixtureTeacher, load_converted, load_teacher, save_teacher

TINY = {
    "ddpmpp-cond": (EDMPrecond, dict(img_resolution=16, img_channels=3, label_dim=4, model_type="SongUNet",
                                     model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
                                     augment_dim=9, dropout=0.13, embedding_type="positional",
                                     encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
                                     resample_filter=[1, 1], use_fp16=False)),
    "ncsnpp-uncond": (EDMPrecond, dict(img_resolution=16, img_channels=3, label_dim=0, model_type="SongUNet",
                                       model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
                                       augment_dim=9, dropout=0.13, embedding_type="fourier",
                                       encoder_type="residual", channel_mult_noise=2, resample_filter=[1, 3, 3, 1])),
    "adm-cond": (EDMPrecond, dict(img_resolution=16, img_channels=3, label_dim=5, use_fp16=True,
                                  model_type="DhariwalUNet", model_channels=64, channel_mult=[1, 2], num_blocks=1,
                                  attn_resolutions=[8], dropout=0.1)),
    "vp": (VPPrecond, dict(img_resolution=16, img_channels=3, model_channels=32, channel_mult=[1, 2], num_blocks=1,
                           attn_resolutions=[8])),
    "ve": (VEPrecond, dict(img_resolution=16, img_channels=3, model_channels=32, channel_mult=[1, 2], num_blocks=1,
                           attn_resolutions=[8], embedding_type="fourier", encoder_type="skip",
                           decoder_type="skip")),
    "iddpm": (iDDPMPrecond, dict(img_resolution=16, img_channels=3, label_dim=3, model_channels=64,
                                 channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])),
}

MODULE_SRC = '"""training/networks.py stand-in: EDM stores the defining module\'s source in every object."""\n'


# ------------------------------------------------------------------------------------------------------------------
# Writing EDM-format snapshots.


def _reconstruct_persistent_obj(meta):  # only its pickled name matters; loaders must never call the real one
    raise AssertionError("the writer's stand-in must never be called")


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


class EDMLoss:
    """Stand-in for EDM's loss object (pickled as a persistent record, ignored by loaders)."""

    def __init__(self):
        self.P_mean, self.P_std, self.sigma_data = -1.2, 1.2, 0.5


@contextlib.contextmanager
def _persistence_module():
    """Registers 'torch_utils.persistence' while pickling (the pickler looks globals up by name), then removes it."""
    package, module = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = module
    sys.modules.update({"torch_utils": package, "torch_utils.persistence": module})
    try:
        yield
    finally:
        del sys.modules["torch_utils"], sys.modules["torch_utils.persistence"]


class _EDMPickler(pickle.Pickler):
    def __init__(self, file, top, module_src, meta_hook, protocol=4):
        super().__init__(file, protocol=protocol)
        self.top, self.module_src, self.meta_hook = top, module_src, meta_hook

    def reducer_override(self, obj):
        if type(obj).__name__ not in KNOWN_CLASSES or not (isinstance(obj, (torch.nn.Module, EDMLoss))):
            return NotImplemented
        state = {k: v for k, v in obj.__dict__.items() if k not in ("config", "name", "source")}
        state["_init_args"] = ()
        if obj is self.top:
            state["_init_kwargs"] = dict(self.top.config["kwargs"])
        else:  # nested objects record their own kwargs; EDM's include numpy float64 values
            state["_init_kwargs"] = {"skip_scale": np.float64(np.sqrt(0.5))}
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=type(obj).__name__, state=state)
        if self.meta_hook is not None:
            meta = self.meta_hook(obj, meta)
        return _reconstruct_persistent_obj, (meta,)


def write_snapshot(path, net, module_src=MODULE_SRC, meta_hook=None, extra=None, protocol=4):
    """An EDM training snapshot: dict(ema=net, loss_fn=EDMLoss, augment_pipe=None, dataset_kwargs=dict)."""
    snapshot = dict(ema=net, loss_fn=EDMLoss(), augment_pipe=None,
                    dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="cifar10.zip",
                                        use_labels=True, xflip=False, cache=True, resolution=32, max_size=50000))
    snapshot.update(extra or {})
    with _persistence_module(), open(path, "wb") as f:
        _EDMPickler(f, net, module_src, meta_hook, protocol).dump(snapshot)
    return Path(path)


def _tiny(name, seed=0):
    cls, kwargs = TINY[name]
    torch.manual_seed(seed)
    net = cls(**kwargs).eval()
    with torch.no_grad():  # leave the (partly zero) init so outputs depend on every weight
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net


# ------------------------------------------------------------------------------------------------------------------
# Round trips.


@pytest.mark.parametrize("name", list(TINY))
def test_snapshot_round_trip_is_exact(tmp_path, name):
    net = _tiny(name)
    path = write_snapshot(tmp_path / "snap.pkl", net)
    assert "torch_utils" not in sys.modules
    loaded = load_edm(path)
    assert "torch_utils" not in sys.modules  # the loader imported nothing it names
    assert type(loaded) is type(net) and not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    ours, theirs = net.state_dict(), loaded.state_dict()
    assert list(ours) == list(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.7, 4.0])
    labels = torch.eye(net.label_dim)[:2] if net.label_dim else None
    torch.testing.assert_close(loaded(x, sigma, labels), net(x, sigma, labels), rtol=0, atol=0)
    assert loaded.name == "snap" and loaded.config == net.config
    assert loaded.source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.source["module_src_sha256"] == hashlib.sha256(MODULE_SRC.encode()).hexdigest()


def test_protocol_3_snapshot(tmp_path):
    """Python <= 3.7 writers use protocol 3, where sets are REDUCE(builtins.set, [...])."""
    net = _tiny("ncsnpp-uncond")
    path = write_snapshot(tmp_path / "p3.pkl", net, protocol=3)
    assert b"builtins" in path.read_bytes()
    assert load_edm(path).identity()["sha256"] == net.identity()["sha256"]


def test_read_returns_inert_records(tmp_path):
    data = read_edm_pickle(write_snapshot(tmp_path / "snap.pkl", _tiny("ddpmpp-cond")))
    assert set(data) == {"ema", "loss_fn", "augment_pipe", "dataset_kwargs"}
    assert data["ema"].class_name == "EDMPrecond" and data["loss_fn"].class_name == "EDMLoss"
    assert data["dataset_kwargs"]["max_size"] == 50000
    block = data["ema"].state["_modules"]["model"].state["_modules"]["enc"].state["_modules"]["16x16_block0"]
    assert block.class_name == "UNetBlock" and block.state["_init_kwargs"]["skip_scale"] == np.sqrt(0.5)
    with pytest.raises(UnsafePickleError):
        data["ema"].class_name = "Evil"


def test_embedded_source_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = (f"import os\nopen({str(marker)!r}, 'w').write('code ran')\nos.system('touch {marker}')\n"
               f"raise SystemExit('payload executed')\n")
    path = write_snapshot(tmp_path / "evil_src.pkl", _tiny("ddpmpp-cond"), module_src=MODULE_SRC + payload)
    loaded = load_edm(path)  # structurally valid: loads, and the payload never runs
    assert not marker.exists()
    assert loaded.source["module_src_sha256"] == hashlib.sha256((MODULE_SRC + payload).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------------------------
# Malicious pickles.


def _short_unicode(s):
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def _call_global_proto4(module, name, arg):
    """PROTO 4; module name STACK_GLOBAL; arg TUPLE1 REDUCE STOP."""
    return b"\x80\x04" + _short_unicode(module) + _short_unicode(name) + b"\x93" + _short_unicode(arg) + b"\x85R."


def _call_global_proto0(module, name, arg):
    """GLOBAL 'module name' MARK UNICODE arg TUPLE REDUCE STOP (protocol 0 text opcodes)."""
    return f"c{module}\n{name}\n(V{arg}\ntR.".encode()


GADGETS = [("os", "system"), ("posix", "system"), ("nt", "system"), ("builtins", "eval"), ("builtins", "exec"),
           ("builtins", "compile"), ("builtins", "getattr"), ("builtins", "__import__"), ("builtins", "open"),
           ("subprocess", "Popen"), ("subprocess", "check_output"), ("runpy", "run_path"),
           ("importlib", "import_module"), ("pickle", "loads"), ("torch", "load"), ("numpy", "load"),
           ("functools", "partial"), ("operator", "attrgetter"), ("operator", "methodcaller"),
           ("types", "FunctionType"), ("types", "CodeType"), ("copyreg", "_reconstructor"), ("torch.jit", "load"),
           ("torch._utils", "_rebuild_parameter_with_state"), ("torch._tensor", "_rebuild_from_type_v2"),
           ("torch_utils.persistence", "persistent_class"), ("dnnlib.util", "open_url"), ("this", "s")]


@pytest.mark.parametrize("module,name", GADGETS, ids=[f"{m}.{n}" for m, n in GADGETS])
def test_gadget_globals_are_refused_before_import(tmp_path, module, name):
    marker = tmp_path / "marker"
    had_this = "this" in sys.modules
    for build in (_call_global_proto4, _call_global_proto0):
        with pytest.raises(UnsafePickleError, match=f"refused global '{module}.{name}'"):
            read_edm_pickle(io.BytesIO(build(module, name, f"touch {marker}")))
    assert not marker.exists()
    assert ("this" in sys.modules) == had_this  # 'this' prints the Zen of Python on import: never imported


def test_gadget_inside_a_valid_snapshot_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return eval, ("1 + 1",)

    path = write_snapshot(tmp_path / "snap.pkl", _tiny("vp"), extra=dict(augment_pipe=Evil()))
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        load_edm(path)


def test_nested_storage_blob_payload_is_refused(tmp_path):
    marker = tmp_path / "marker"

    class Evil:
        def __reduce__(self):
            import os  # noqa: PLC0415
            return os.system, (f"touch {marker}",)

    blob = io.BytesIO()
    torch.save(Evil(), blob, _use_new_zipfile_serialization=False)  # a legacy blob like a storage's, poisoned
    data = (b"\x80\x04" + _short_unicode("torch.storage") + _short_unicode("_load_from_bytes") + b"\x93"
            + b"B" + struct.pack("<I", len(blob.getvalue())) + blob.getvalue() + b"\x85R.")
    with pytest.raises(UnsafePickleError, match="refused nested storage blob"):
        read_edm_pickle(io.BytesIO(data))
    assert not marker.exists()


def test_allowed_functions_cannot_be_modified():
    original = torch._utils._rebuild_tensor_v2.__defaults__
    # GLOBAL torch._utils _rebuild_tensor_v2; BUILD with slot state (None, {'__defaults__': ('x',)})
    data = (b"\x80\x04" + _short_unicode("torch._utils") + _short_unicode("_rebuild_tensor_v2") + b"\x93"
            + b"N}" + _short_unicode("__defaults__") + _short_unicode("x") + b"\x85s\x86b.")
    with pytest.raises(UnsafePickleError, match="modify"):
        read_edm_pickle(io.BytesIO(data))
    assert torch._utils._rebuild_tensor_v2.__defaults__ == original


def _hook_top(**changes):
    def hook(obj, meta):
        if obj.__class__.__name__.endswith("Precond"):
            meta = dict(meta)
            for key, value in changes.items():
                if key == "extra_field":
                    meta["extra"] = value
                elif key in ("class_name", "version", "type"):
                    meta[key] = value
                else:
                    meta["state"] = dict(meta["state"], _init_kwargs=dict(meta["state"]["_init_kwargs"],
                                                                          **{key: value}))
        return meta
    return hook


class _ObjectScalar:
    """Pickles as numpy's scalar(dtype('O'), payload): an object-dtype numpy scalar."""

    def __reduce__(self):
        return np._core.multiarray.scalar, (np.dtype("O"), "payload")


@pytest.mark.parametrize("hook,error,match", [
    (_hook_top(class_name="EvilPrecond"), UnsafePickleError, "unknown class 'EvilPrecond'"),
    (_hook_top(version=5), UnsafePickleError, "version"),
    (_hook_top(type="function"), UnsafePickleError, "type"),
    (_hook_top(extra_field=1), UnsafePickleError, "exactly the fields"),
    (_hook_top(evil_arg=1), ValueError, "unsupported constructor argument.*evil_arg"),
    (_hook_top(model_type="UNet2DModel"), ValueError, "unsupported architecture model_type='UNet2DModel'"),
    (_hook_top(encoder_type="fancy"), ValueError, "encoder_type='fancy' is not supported"),
    (_hook_top(channel_mult=object()), UnsafePickleError, "refused global 'builtins.object'"),
    (_hook_top(dropout=_ObjectScalar()), UnsafePickleError, "numpy scalar of dtype object"),
], ids=["class", "version", "type", "meta-field", "kwarg", "model_type", "encoder_type", "object-kwarg",
        "object-scalar"])
def test_malformed_snapshots_are_refused(tmp_path, hook, error, match):
    path = write_snapshot(tmp_path / "bad.pkl", _tiny("ddpmpp-cond"), meta_hook=hook)
    with pytest.raises(error, match=match):
        load_edm(path)


def _edit_tensors(edit):
    def hook(obj, meta):
        if type(obj).__name__ == "Linear" and meta["state"]["_parameters"]["weight"].shape[0] == 128:  # map_layer0
            meta = dict(meta, state=dict(meta["state"], _parameters=edit(dict(meta["state"]["_parameters"]))))
        return meta
    return hook


@pytest.mark.parametrize("edit,match", [
    (lambda p: dict(p, weight=torch.zeros(3, 3)), "shape mismatches.*map_layer0.weight"),
    (lambda p: {k: v for k, v in p.items() if k != "bias"}, "missing.*map_layer0.bias"),
    (lambda p: dict(p, extra=torch.zeros(2)), "unexpected.*map_layer0.extra"),
], ids=["shape", "missing", "unexpected"])
def test_weights_must_match_strictly(tmp_path, edit, match):
    path = write_snapshot(tmp_path / "bad.pkl", _tiny("ddpmpp-cond"), meta_hook=_edit_tensors(edit))
    with pytest.raises(ValueError, match=match):
        load_edm(path)


def test_non_tensor_weights_and_wrong_layout_are_refused(tmp_path):
    path = write_snapshot(tmp_path / "bad.pkl", _tiny("ddpmpp-cond"),
                          meta_hook=_edit_tensors(lambda p: dict(p, weight="not a tensor")))
    with pytest.raises(UnsafePickleError, match="expected a tensor"):
        load_edm(path)
    with pytest.raises(UnsafePickleError, match="key 'network'"):
        load_edm(write_snapshot(tmp_path / "x.pkl", _tiny("vp")), key="network")
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"ema": {"weight": 1}}))
    with pytest.raises(UnsafePickleError, match="top-level network"):
        load_edm(plain)


# ------------------------------------------------------------------------------------------------------------------
# Names, cache, download, conversion.


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("GET_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("GET_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "get"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "get"


def test_official_name_downloads_once_into_the_cache(monkeypatch, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    write_snapshot(mirror / "edm-cifar10-32x32-cond-vp.pkl", _tiny("ddpmpp-cond"))
    monkeypatch.setenv("GET_CACHE", str(tmp_path / "cache"))
    first = load_edm("edm-cifar10-32x32-cond-vp", base_url=mirror.as_uri())
    cached = tmp_path / "cache" / "edm" / "edm-cifar10-32x32-cond-vp.pkl"
    assert cached.is_file() and first.name == "edm-cifar10-32x32-cond-vp"
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no temporary leftovers
    (mirror / "edm-cifar10-32x32-cond-vp.pkl").unlink()
    again = load_edm("edm-cifar10-32x32-cond-vp", base_url=mirror.as_uri())  # reused, not downloaded
    assert again.identity()["sha256"] == first.identity()["sha256"]


def test_offline_error_says_where_to_put_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("GET_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as info:
        load_edm("edm-imagenet-64x64-cond-adm", base_url=(tmp_path / "nowhere").as_uri())
    message = str(info.value)
    assert str(tmp_path / "cache" / "edm" / "edm-imagenet-64x64-cond-adm.pkl") in message and "GET_CACHE" in message
    assert not any((tmp_path / "cache" / "edm").iterdir())
    with pytest.raises(FileNotFoundError, match="neither an existing file nor an official"):
        load_edm(tmp_path / "missing.pkl")


def test_converted_teacher_round_trip_without_pickle(tmp_path):
    net = load_edm(write_snapshot(tmp_path / "snap.pkl", _tiny("adm-cond")))
    folder = save_teacher(net, tmp_path / "converted")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    again = load_teacher(str(folder))
    assert type(again) is EDMPrecond and again.identity() == net.identity()
    assert again.source == net.source and again.use_fp16
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 9.0]), torch.eye(5)[[1, 4]]
    torch.testing.assert_close(again(x, sigma, labels), net(x, sigma, labels), rtol=0, atol=0)
    assert load_teacher(str(tmp_path / "snap.pkl")).identity() == net.identity()
    # A corrupted weights file is detected.
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_converted(folder)


# ------------------------------------------------------------------------------------------------------------------
# Crafted tensor records, sizes and structures: refused quickly, before their claimed sizes are allocated.


class _View:
    """Pickles as _rebuild_tensor_v2(storage, offset, size, stride): a tensor record of any layout over a storage."""

    def __init__(self, storage, size, stride, offset=0):
        self.storage, self.size, self.stride, self.offset = storage, tuple(size), tuple(stride), offset

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, self.offset, self.size, self.stride, False,
                                                 collections.OrderedDict())


class _Blob:
    """Pickles as torch.storage._load_from_bytes(data) with hand-made blob bytes."""

    def __init__(self, data):
        self.data = data

    def __reduce__(self):
        return torch.storage._load_from_bytes, (self.data,)


def _legacy_blob(claimed, values, header=None):
    """A nested legacy torch.save blob of one float storage whose record claims ``claimed`` elements."""
    out = io.BytesIO()
    for obj in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                              "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(obj, out, protocol=2)
    record, marker = ("storage", torch.FloatStorage, "0", "cpu", claimed, None), object()

    class _RecordPickler(pickle.Pickler):
        def persistent_id(self, obj):
            return record if obj is marker else None

    _RecordPickler(out, protocol=2).dump(marker)
    pickle.dump(["0"], out, protocol=2)
    out.write(struct.pack("<q", claimed if header is None else header))
    out.write(np.asarray(values, dtype=np.float32).tobytes())
    return out.getvalue()


def _storage(n):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.zeros(n)._typed_storage()


_MAP0 = (128, 32)  # map_layer0.weight of the 'ddpmpp-cond' network


@pytest.mark.parametrize("weight,match", [
    (_View(_storage(4), _MAP0, (32, 1)), "past the storage"),  # grew the storage / read heap memory before
    (_View(_storage(4), _MAP0, (32, 1), offset=3), "past the storage"),
    (_View(_storage(1), _MAP0, (0, 0)), "overlap"),  # one float expanded into a (128, 32) weight
    (_View(_storage(128 + 31), _MAP0, (1, 1)), "overlap"),
    (_View(_storage(4), (50_000, 50_000), (50_000, 1)), "past the storage"),  # claims 10 GB
    (_View(_storage(4), _MAP0, (32, -1)), "non-negative"),
    (_View(_storage(4), _MAP0, (32,)), "2 sizes and 1 strides"),
    (_View(_Blob(_legacy_blob(10**10, [1, 2, 3, 4])), (4,), (1,)), "claims 10000000000 x 4 bytes"),
    (_View(_Blob(_legacy_blob(4, [1, 2, 3, 4], header=5)), (4,), (1,)), "header does not match"),
    (_View(_Blob(b"\x80\x02K\x01."), (1,), (1,)), "not a legacy torch.save blob"),
], ids=["size", "offset", "zero-stride", "overlap", "10GB", "negative", "ndim", "blob-10GB", "blob-header",
        "blob-magic"])
def test_tensor_records_outside_their_storage_are_refused(tmp_path, fails_fast, weight, match):
    path = write_snapshot(tmp_path / "bad.pkl", _tiny("ddpmpp-cond"), meta_hook=_edit_tensors(
        lambda p: dict(p, weight=weight)))
    with fails_fast(seconds=10, max_mb=200), pytest.raises(UnsafePickleError, match=match):
        load_edm(path)


def test_views_sharing_one_storage_cannot_outgrow_the_file(tmp_path):
    """Every weight a view of one shared storage: each view is valid, together they hold far more than the file."""
    net = _tiny("ddpmpp-cond")
    shared = _storage(max(p.numel() for p in net.state_dict().values()))

    def hook(obj, meta):
        if not isinstance(obj, torch.nn.Module):  # the loss object
            return meta
        params = {k: v if v is None else _View(shared, v.shape, torch.empty(v.shape).stride())
                  for k, v in meta["state"]["_parameters"].items()}
        return dict(meta, state=dict(meta["state"], _parameters=params))

    path = write_snapshot(tmp_path / "shared.pkl", net, meta_hook=hook)
    with pytest.raises(UnsafePickleError, match=f"more than the {path.stat().st_size} bytes of the file"):
        load_edm(path)


def _chain(depth, fan_out):
    """UNetBlock records nested ``depth`` deep, each holding the next one under ``fan_out`` names (shared)."""
    block = UNetBlock()
    for _ in range(depth):
        parent = UNetBlock()
        for i in range(fan_out):
            parent.add_module(f"c{i}", block)
        block = parent
    return block


class UNetBlock(torch.nn.Module):
    """Pickled as a persistent 'UNetBlock' record by the writer."""


def _replace_children(**children):
    def hook(obj, meta):
        if obj.__class__.__name__.endswith("Precond"):
            meta = dict(meta, state=dict(meta["state"], _modules=collections.OrderedDict(children)))
        return meta
    return hook


def test_shared_records_are_not_walked_exponentially(tmp_path, fails_fast):
    path = write_snapshot(tmp_path / "dag.pkl", _tiny("vp"), meta_hook=_replace_children(model=_chain(30, 2)))
    assert path.stat().st_size < 100_000  # 2^30 paths in a small file
    with fails_fast(seconds=10), pytest.raises(UnsafePickleError, match="same module record also appears"):
        load_edm(path)


def test_deep_records_give_a_clear_error(tmp_path):
    path = write_snapshot(tmp_path / "deep.pkl", _tiny("vp"), meta_hook=_replace_children(model=_chain(60, 1)))
    with pytest.raises(UnsafePickleError, match="nested deeper than 32 levels"):
        load_edm(path)


def _nested_list(depth):
    value = [1]
    for _ in range(depth):
        value = [value, value]
    return value


@pytest.mark.parametrize("name,hook,match", [
    ("ddpmpp-cond", _hook_top(num_blocks=10**6), r"num_blocks must be an integer in \[1, 64\]"),
    ("ddpmpp-cond", _hook_top(model_channels=10**6), "model_channels must be an integer"),
    ("ddpmpp-cond", _hook_top(img_resolution=2**20), "img_resolution must be an integer"),
    ("ddpmpp-cond", _hook_top(channel_mult=[1] * 1000), "has 1000 items"),
    ("ddpmpp-cond", _hook_top(channel_mult=_nested_list(40)), "nested lists"),  # 2^40 paths
    ("ddpmpp-cond", _hook_top(num_blocks=2.5), "num_blocks must be an integer"),
    ("ddpmpp-cond", _hook_top(dropout=float("nan")), "dropout must be a finite number"),
    ("iddpm", _hook_top(M=10**9), r"M must be an integer in \[1, 10000\]"),
], ids=["num_blocks", "channels", "resolution", "long-list", "shared-lists", "float-int", "nan", "iddpm-M"])
def test_oversized_constructor_arguments_are_refused_before_building(tmp_path, fails_fast, name, hook, match):
    path = write_snapshot(tmp_path / "big.pkl", _tiny(name), meta_hook=hook)
    with fails_fast(seconds=10, max_mb=200), pytest.raises((ValueError, UnsafePickleError), match=match):
        load_edm(path)


def test_constructor_sizes_must_match_the_weights(tmp_path):
    path = write_snapshot(tmp_path / "big.pkl", _tiny("ddpmpp-cond"), meta_hook=_hook_top(num_blocks=3))
    with pytest.raises(ValueError, match="weights do not match"):
        load_edm(path)


def test_protocol_2_snapshot(tmp_path):
    """Protocol 2 names sets '__builtin__.set' and writes bytes as _codecs.encode(text, 'latin1')."""
    net = _tiny("ncsnpp-uncond")
    path = write_snapshot(tmp_path / "p2.pkl", net, protocol=2)
    assert b"__builtin__" in path.read_bytes() and b"_codecs" in path.read_bytes()
    assert load_edm(path).identity()["sha256"] == net.identity()["sha256"]
    for module, name in (("__builtin__", "eval"), ("copy_reg", "_reconstructor"), ("_codecs", "decode")):
        with pytest.raises(UnsafePickleError, match=f"refused global '{module}.{name}'"):
            read_edm_pickle(io.BytesIO(_call_global_proto0(module, name, "x")))
    with pytest.raises(UnsafePickleError, match="only as encode"):
        read_edm_pickle(io.BytesIO(b"c_codecs\nencode\n(Vx\nVrot13\ntR."))


def _rewrite_config(folder, edit, rehash=True):
    """Edits config.json; with ``rehash`` also recomputes config_sha256 as a forger would (it is no signature)."""
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    if rehash:
        body = {k: v for k, v in config.items() if k != "config_sha256"}
        config["config_sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    (folder / "config.json").write_text(json.dumps(config))


def test_converted_config_is_covered_by_its_hash(tmp_path):
    folder = save_teacher(load_edm(write_snapshot(tmp_path / "snap.pkl", _tiny("ddpmpp-cond"))), tmp_path / "c")
    _rewrite_config(folder, lambda c: c["kwargs"].update(sigma_data=0.7), rehash=False)  # same tensors
    with pytest.raises(ValueError, match="config.json: config_sha256 does not match"):
        load_converted(folder)
    _rewrite_config(folder, lambda c: c.update(version=1))
    with pytest.raises(ValueError, match="version 1, expected 2"):
        load_converted(folder)


def _set_kwargs(**changes):
    return lambda config: config["kwargs"].update(changes)


@pytest.mark.parametrize("teacher,edit,match", [
    ("ddpmpp-cond", _set_kwargs(num_blocks=10**6), "config.json: num_blocks must be an integer"),
    ("iddpm", _set_kwargs(M=10**9), "config.json: M must be an integer"),
    ("ddpmpp-cond", _set_kwargs(model_channels=64), "weights do not match"),
    ("mixture", _set_kwargs(resolution=1024, num_components=10_000), r"needs means of shape \(10000, 2097152\)"),
    ("mixture", _set_kwargs(rank=1000), r"needs factors of shape \(3, 32, 1000\)"),
    ("mixture", _set_kwargs(resolution=10**6), "resolution must be an integer"),
    ("mixture", _set_kwargs(max_frequency=10**4), "max_frequency must be an integer"),
], ids=["num_blocks", "iddpm-M", "channels", "mixture-size", "mixture-rank", "mixture-resolution",
        "mixture-frequency"])
def test_converted_config_sizes_are_checked_before_building(tmp_path, fails_fast, teacher, edit, match):
    if teacher == "mixture":
        net = MixtureTeacher(resolution=4, channels=2, num_components=3, rank=2, seed=1)
    else:
        net = load_edm(write_snapshot(tmp_path / "snap.pkl", _tiny(teacher)))
    folder = save_teacher(net, tmp_path / "c")
    _rewrite_config(folder, edit)
    with fails_fast(seconds=10, max_mb=200), pytest.raises(ValueError, match=match):
        load_converted(folder)


def _hook_meta(edit):
    def hook(obj, meta):
        return edit(dict(meta, state=dict(meta["state"]))) if obj.__class__.__name__.endswith("Precond") else meta
    return hook


@pytest.mark.parametrize("edit,match", [
    (lambda m: dict(m, class_name=["EDMPrecond"]), "unknown class"),
    (lambda m: {**m, 1: 2}, "exactly the fields"),
    (lambda m: dict(m, state=dict(m["state"], _init_args=torch.zeros(2))), "positional _init_args"),
    (lambda m: dict(m, state=dict(m["state"], _init_kwargs={1: 2})), "string keys"),
    (lambda m: dict(m, state=dict(m["state"], _modules={1: None})), "_modules has a key of type int"),
    (lambda m: dict(m, state=dict(m["state"], _non_persistent_buffers_set=[])), "_non_persistent_buffers_set"),
], ids=["class-list", "int-field", "tensor-args", "int-kwarg", "int-module", "list-set"])
def test_malformed_records_give_clear_errors(tmp_path, edit, match):
    path = write_snapshot(tmp_path / "bad.pkl", _tiny("vp"), meta_hook=_hook_meta(edit))
    with pytest.raises(UnsafePickleError, match=match) as info:
        load_edm(path)
    assert str(path) in str(info.value)
