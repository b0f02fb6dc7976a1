"""get.distill.real_data: every source on small files written here (and corrupt ones), exact streams and resume, the
analytic teacher's exact samples, and make_real_source's choice."""

import io
import json
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import make_folder  # tests/ is on sys.path under pytest

from get.distill import real_data as rd
from get.distill.real_data import RealDataError
from get.teachers import MixtureTeacher

R, C = 4, 3


def geometry(label_dim=0, resolution=R, channels=C):
    """What the sources check against: a teacher's shape and classes (no denoiser needed)."""
    return SimpleNamespace(name="test-teacher", resolution=resolution, channels=channels, label_dim=label_dim)


def coded_images(n, resolution=R, channels=C):
    """(n, C, R, R) uint8 whose pixel values encode the image index: value = 10 * i + channel."""
    base = 10 * np.arange(n, dtype=np.uint8)[:, None, None, None] + np.arange(channels, dtype=np.uint8)[:, None, None]
    return np.broadcast_to(base, (n, channels, resolution, resolution)).copy()


def decode_index(x):
    """The image indices (B,) of a batch of coded images in [-1, 1]."""
    return torch.round((x[:, 0, 0, 0] + 1) * 127.5 / 10).long()


def check_batch(x, labels, label_of=None):
    """Shape, dtype and value range of a batch, its pixels coded as coded_images'; returns the indices."""
    assert x.dtype == torch.float32 and x.shape[1:] == (C, R, R)
    assert x.min() >= -1 and x.max() <= 1
    idx = decode_index(x)
    expected = torch.from_numpy(coded_images(int(idx.max()) + 1)).float()[idx] / 127.5 - 1
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    if label_of is None:
        assert labels is None
    else:
        assert labels.dtype == torch.int64 and torch.equal(labels, label_of(idx))
    return idx


def write_npz(path, images_nchw, **extra):
    np.savez(path, arr_0=images_nchw.transpose(0, 2, 3, 1), **extra)
    return path


def write_pngs(root, images_nchw, labels=None):
    """EDM dataset_tool's layout: 00000/img00000000.png ..., and dataset.json when labels are given."""
    names = []
    for i, img in enumerate(images_nchw):
        name = f"{i // 1000:05d}/img{i:08d}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        array = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        Image.fromarray(array).save(root / name)
        names.append(name)
    if labels is not None:
        (root / "dataset.json").write_text(json.dumps({"labels": [[n, int(lab)] for n, lab in zip(names, labels)]}))
    return root


def write_cifar(root, per_file=3, test=2):
    """A miniature binary release: 5 train files of per_file records and a test file; label of image i = i % 10."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    images = coded_images(5 * per_file + test, 32, 3)
    records = np.concatenate([(np.arange(len(images)) % 10).astype(np.uint8)[:, None],
                              images.reshape(len(images), -1)], axis=1)  # (N, 3073)
    for k in range(5):
        (folder / f"data_batch_{k + 1}.bin").write_bytes(records[k * per_file:(k + 1) * per_file].tobytes())
    (folder / "test_batch.bin").write_bytes(records[5 * per_file:].tobytes())
    return folder


def stream(source, batches, batch_size):
    return [source.sample(batch_size) for _ in range(batches)]


def assert_same_batches(a, b):
    for (xa, la), (xb, lb) in zip(a, b):
        assert torch.equal(xa, xb) and (la is None and lb is None or torch.equal(la, lb))


# ----------------------------------------------------------------------------------------------------------------


def test_teacher_samples_are_exact_reproducible_and_resumable():
    teacher = MixtureTeacher(resolution=R, channels=C, num_components=4, rank=1, conditional=True, num_classes=2)
    source = rd.make_real_source("exact", teacher, seed=3)
    assert isinstance(source, rd.TeacherSamples) and isinstance(source, rd.RealSource)
    x, labels = source.sample(6)
    assert x.dtype == torch.float32 and x.shape == (6, C, R, R) and labels.dtype == torch.int64
    assert bool(((labels >= 0) & (labels < 2)).all())
    # The batch is the teacher's own sampler with the documented seed.
    gen = torch.Generator().manual_seed(rd.derived_seed(3, 0, 0))
    x64, lab = teacher.sample(6, generator=gen)
    assert torch.equal(x, x64.float()) and torch.equal(labels, lab)
    state = source.state_dict()
    after = stream(source, 2, 6)
    again = rd.make_real_source("teacher", teacher, seed=3)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert_same_batches(stream(again, 2, 6), after)
    assert not torch.equal(rd.TeacherSamples(teacher, seed=3, rank=1).sample(6)[0], x)  # ranks differ
    with pytest.raises(ValueError, match="seed was 3, now 4"):
        rd.TeacherSamples(teacher, seed=4).load_state_dict(state)
    unconditional = MixtureTeacher(resolution=R, channels=C, num_components=2, rank=1)
    assert rd.make_real_source(None, unconditional).sample(2)[1] is None  # the default for the analytic teacher
    with pytest.raises(RealDataError, match="test-teacher has no exact sampler"):
        rd.TeacherSamples(geometry())
    assert rd.default_real_spec(geometry()) == "pairs"


def test_npz_images_epochs_labels_and_resume(tmp_path):
    images, labels = coded_images(5), np.arange(5) % 3
    path = write_npz(tmp_path / "data.npz", images, labels=labels)
    source = rd.make_real_source(str(path), geometry(label_dim=3), seed=1)
    assert isinstance(source, rd.NpzImages)
    batches = stream(source, 4, 3)  # 12 images: two whole epochs and two more
    idx = torch.cat([check_batch(x, lab, lambda i: i % 3) for x, lab in batches])
    assert sorted(idx[:5].tolist()) == list(range(5)) and sorted(idx[5:10].tolist()) == list(range(5))
    assert idx[:5].tolist() != idx[5:10].tolist()  # a new permutation each epoch
    fresh = rd.NpzImages(path, geometry(label_dim=3), seed=1)
    fresh.sample(3)
    state = fresh.state_dict()
    resumed = rd.NpzImages(path, geometry(label_dim=3), seed=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert_same_batches(stream(resumed, 3, 3), batches[1:])
    # Unconditional teacher: labels are ignored; two ranks read disjoint halves of an epoch.
    ranks = [rd.NpzImages(path, geometry(), seed=1, rank=r, world_size=2) for r in range(2)]
    halves = [check_batch(*s.sample(2)) for s in ranks]
    assert not set(halves[0].tolist()) & set(halves[1].tolist())
    with pytest.raises(ValueError, match="NpzImages of 5 images"):
        rd.NpzImages(write_npz(tmp_path / "six.npz", coded_images(6)), geometry()).load_state_dict(state)


def crafted_npz(path, shape, payload=b"\0" * 16):
    """An .npz whose arr_0 header claims ``shape`` uint8 but holds only ``payload``."""
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("arr_0.npy", member.getvalue() + payload)
    return path


@pytest.mark.parametrize("case, match", [
    ("float", r"arr_0 must be uint8 images \(N, H, W, C\), got float32"),
    ("3d", r"arr_0 must be uint8 images \(N, H, W, C\), got uint8 \(5, 4, 4\)"),
    ("channels", r"arr_0 has 5 images of \(H, W, C\) \(4, 4, 1\); teacher test-teacher needs .*\(4, 4, 3\)"),
    ("resolution", r"arr_0 has 5 images of \(H, W, C\) \(8, 8, 3\)"),
    ("empty", r"arr_0 has 0 images"),
    ("no-labels", r"no labels \('labels' or 'arr_1'\), but teacher test-teacher is conditional \(3 classes\)"),
    ("label-range", r"labels must lie in \[0, 3\) for the teacher's 3 classes, found \[3, 4\]"),
    ("label-shape", r"labels 'labels' must be \(5,\) integers"),
    ("no-arr_0", r"no images under key 'arr_0'"),
    ("not-zip", r"not a readable .npz \(zip\) file"),
    ("huge-header", r"header claims \(1000000000, 4, 4, 3\) = 48000000000 bytes but the member holds 16"),
    ("pickled", r"arr_0 must be uint8 images"),
])
def test_npz_errors_name_the_file_and_the_problem(tmp_path, fails_fast, case, match):
    path, images = tmp_path / f"{case}.npz", coded_images(5)
    label_dim = 3 if case.startswith(("no-labels", "label")) else 0
    if case == "float":
        write_npz(path, images.astype(np.float32))
    elif case == "3d":
        np.savez(path, arr_0=images[:, 0])
    elif case == "channels":
        write_npz(path, images[:, :1])
    elif case == "resolution":
        write_npz(path, coded_images(5, resolution=8))
    elif case == "empty":
        write_npz(path, images[:0])
    elif case == "no-labels":
        write_npz(path, images)
    elif case == "label-range":
        write_npz(path, images, labels=np.arange(5))
    elif case == "label-shape":
        write_npz(path, images, labels=np.zeros((5, 2), np.int64))
    elif case == "no-arr_0":
        np.savez(path, images=images)
    elif case == "not-zip":
        path.write_bytes(b"not a zip file")
    elif case == "huge-header":
        crafted_npz(path, (10 ** 9, R, R, C))
    elif case == "pickled":
        np.savez(path, arr_0=np.array([{"a": 1}], dtype=object))
    with fails_fast(10, 200), pytest.raises(RealDataError, match=match) as err:
        rd.make_real_source(str(path), geometry(label_dim=label_dim))
    assert str(path) in str(err.value)


def test_png_folder_with_dataset_json(tmp_path):
    labels = np.array([2, 0, 1, 1, 0, 2])
    root = write_pngs(tmp_path / "pngs", coded_images(6), labels)
    source = rd.make_real_source(root, geometry(label_dim=3), seed=2)
    assert isinstance(source, rd.PngFolder) and source.files[0] == "00000/img00000000.png"
    batches = stream(source, 3, 4)
    idx = torch.cat([check_batch(x, lab, lambda i: torch.from_numpy(labels)[i]) for x, lab in batches])
    assert sorted(idx[:6].tolist()) == list(range(6))
    resumed = rd.PngFolder(root, geometry(label_dim=3), seed=2)
    resumed.load_state_dict(rd.PngFolder(root, geometry(label_dim=3), seed=2).state_dict())
    assert_same_batches(stream(resumed, 3, 4), batches)
    gray = write_pngs(tmp_path / "gray", coded_images(2, channels=1))
    x, lab = rd.make_real_source(gray, geometry(channels=1)).sample(2)
    assert x.shape == (2, 1, R, R) and lab is None


@pytest.mark.parametrize("case, match", [
    ("empty", r"no .png files in this folder"),
    ("size", r"img00000001.png: a PNG image of 8x8 pixels, mode RGB; the teacher needs a PNG of 4x4, mode RGB"),
    ("mode", r"img00000001.png: a PNG image of 4x4 pixels, mode L; .* mode RGB"),
    ("garbage", r"img00000001.png: not a readable PNG"),
    ("no-json", r"dataset.json: missing; teacher test-teacher is conditional \(3 classes\)"),
    ("null-labels", r"dataset.json: has no labels"),
    ("bad-json", r"dataset.json: not a dataset_tool label file"),
    ("missing-label", r"dataset.json: no label for 1 of 3 images, e.g. \['00000/img00000002.png'\]"),
    ("label-range", r"dataset.json: labels must lie in \[0, 3\) .* found \[7\]"),
])
def test_png_folder_errors_name_the_file_and_the_problem(tmp_path, case, match):
    root = tmp_path / "pngs"
    root.mkdir()
    label_dim = 3 if case in ("no-json", "null-labels", "bad-json", "missing-label", "label-range") else 0
    if case != "empty":
        write_pngs(root, coded_images(3), [0, 1, 7 if case == "label-range" else 2] if label_dim else None)
    second = root / "00000" / "img00000001.png"
    if case == "size":
        Image.fromarray(coded_images(1, resolution=8)[0].transpose(1, 2, 0)).save(second)
    elif case == "mode":
        Image.fromarray(coded_images(1, channels=1)[0, 0]).save(second)
    elif case == "garbage":
        second.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    elif case == "no-json":
        (root / "dataset.json").unlink()
    elif case == "null-labels":
        (root / "dataset.json").write_text('{"labels": null}')
    elif case == "bad-json":
        (root / "dataset.json").write_text('{"labels": [1, 2, 3]}')
    elif case == "missing-label":
        (root / "dataset.json").write_text(json.dumps({"labels": [["00000/img00000000.png", 0],
                                                                  ["00000/img00000001.png", 1]]}))
    with pytest.raises(RealDataError, match=match):
        source = rd.make_real_source(root, geometry(label_dim=label_dim))
        source.sample(3)  # the images after the first are checked when a batch decodes them


def test_cifar10_binary_release(tmp_path):
    folder = write_cifar(tmp_path)
    teacher = geometry(label_dim=10, resolution=32)
    for spec in (folder, tmp_path):  # the folder itself or its parent
        source = rd.make_real_source(str(spec), teacher, seed=5)
        assert isinstance(source, rd.Cifar10Binary) and source.size == 15
    x, labels = source.sample(15)
    idx = decode_index(x)
    assert sorted(idx.tolist()) == list(range(15)) and torch.equal(labels, idx % 10)
    expected = torch.from_numpy(coded_images(17, 32, 3)).float()[idx] / 127.5 - 1
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)  # CHW planes in record order
    test = rd.make_real_source(str(folder), teacher, split="test")
    assert sorted(decode_index(test.sample(2)[0]).tolist()) == [15, 16]
    resumed = rd.Cifar10Binary(folder, teacher, seed=5)
    state = resumed.state_dict()
    first = stream(resumed, 2, 4)
    again = rd.Cifar10Binary(folder, teacher, seed=5)
    again.load_state_dict(state)
    assert_same_batches(stream(again, 2, 4), first)
    assert rd.Cifar10Binary(folder, geometry(resolution=32)).sample(2)[1] is None


@pytest.mark.parametrize("case, match", [
    ("truncated", r"data_batch_3.bin: 9218 bytes is not a whole number of 3073-byte records"),
    ("missing", r"missing data_batch_2.bin, data_batch_5.bin of CIFAR-10's binary release \(train\)"),
    ("label", r"labels must lie in \[0, 10\) .* found \[12\]"),
    ("python", r"pickled Python release, which is never unpickled here .* binary release"),
    ("teacher", r"CIFAR-10 is 3 x 32 x 32 with 10 classes; teacher test-teacher has 3 x 4 with 0 classes"),
])
def test_cifar10_errors(tmp_path, case, match):
    folder, teacher = write_cifar(tmp_path), geometry(label_dim=10, resolution=32)
    if case == "truncated":
        path = folder / "data_batch_3.bin"
        path.write_bytes(path.read_bytes()[:-1])
    elif case == "missing":
        (folder / "data_batch_2.bin").unlink()
        (folder / "data_batch_5.bin").unlink()
    elif case == "label":
        path = folder / "data_batch_1.bin"
        path.write_bytes(b"\x0c" + path.read_bytes()[1:])
    elif case == "python":
        folder = tmp_path / "cifar-10-batches-py"
        folder.mkdir()
        for name in ("data_batch_1", "batches.meta"):
            (folder / name).write_bytes(b"\x80\x04 never read")
    elif case == "teacher":
        teacher = geometry()
    with pytest.raises(RealDataError, match=match):
        rd.make_real_source(str(folder), teacher)


def test_pair_images_and_unknown_specs(tmp_path):
    make_folder(tmp_path / "pairs", list(range(6)), label_dim=2)
    source = rd.make_real_source("pairs", geometry(label_dim=2), pairs=tmp_path / "pairs", seed=0)
    assert isinstance(source, rd.PairImages)
    x, labels = source.sample(6)
    seeds = torch.round(-x[:, 0, 0, 0]).long()  # the test pairs' image is -(seed + position code)
    assert sorted(seeds.tolist()) == list(range(6)) and torch.equal(labels, seeds % 2)
    with pytest.raises(RealDataError, match="pairs with 2 classes, teacher test-teacher has 5"):
        rd.make_real_source("pairs", geometry(label_dim=5), pairs=tmp_path / "pairs")
    with pytest.raises(RealDataError, match=r"pairs of 3 channels x 4 pixels, teacher test-teacher has 3 x 8"):
        rd.make_real_source("pairs", geometry(resolution=8), pairs=tmp_path / "pairs")
    with pytest.raises(ValueError, match="needs the pair folder"):
        rd.make_real_source("pairs", geometry())
    with pytest.raises(RealDataError, match="'nowhere.npz': not one of teacher, exact, pairs"):
        rd.make_real_source("nowhere.npz", geometry())
