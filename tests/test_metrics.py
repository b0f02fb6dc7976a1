"""Tests of get.metrics: Fréchet distance numerics, the offline clean-fid plumbing, exact mixture-teacher metrics."""

import math

import numpy as np
import pytest
import torch
from cleanfid import fid as cfid
from cleanfid.inception_torchscript import InceptionV3W
from PIL import Image

from get import metrics

# ---------------------------------------------------------------------------------------------------------------
# Fréchet distance


def _random_spd(d, rng, cond=10.0):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.geomspace(1.0, 1.0 / cond, d)) @ q.T


def test_frechet_distance_closed_form_commuting():
    # Diagonal covariances commute: FD = ‖Δμ‖² + Σ (√a_i − √b_i)².
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # Same in a rotated basis (non-diagonal but still commuting).
    q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    got = metrics.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_non_commuting_closed_form():
    # With Σ1 = I: tr (Σ1^½ Σ2 Σ1^½)^½ = Σ √λ(Σ2); also the distance to itself is 0.
    rng = np.random.default_rng(1)
    s2 = _random_spd(12, rng)
    lam = np.linalg.eigvalsh(s2)
    expected = 12 + lam.sum() - 2 * np.sqrt(lam).sum()
    assert metrics.frechet_distance(np.zeros(12), np.eye(12), np.zeros(12), s2) == pytest.approx(expected, rel=1e-12)
    assert abs(metrics.frechet_distance(np.ones(12), s2, np.ones(12), s2)) < 1e-12


def test_frechet_distance_matches_cleanfid_on_features():
    rng = np.random.default_rng(2)
    f1 = rng.standard_normal((300, 64)) @ rng.standard_normal((64, 64))
    f2 = rng.standard_normal((400, 64)) @ rng.standard_normal((64, 64)) + 0.3
    s1, s2 = metrics.GaussianStats.from_features(f1), metrics.GaussianStats.from_features(f2)
    expected = cfid.fid_from_feats(f1, f2)
    assert s1.frechet_distance(s2) == pytest.approx(expected, rel=1e-9)
    assert metrics.frechet_distance(s2.mu, s2.sigma, s1.mu, s1.sigma) == pytest.approx(expected, rel=1e-9)
    # Sample set against a fixed Gaussian: both branches (n ≤ D via the Gram matrix, n > D via D×D).
    ref = metrics.GaussianReference(s2.mu, s2.sigma)
    assert ref.frechet_distance(f1) == pytest.approx(expected, rel=1e-9)
    few = f1[:40]  # n = 40 < D = 64: singular sample covariance
    expected_few = cfid.frechet_distance(few.mean(0), np.cov(few, rowvar=False), s2.mu, s2.sigma)
    assert ref.frechet_distance(few) == pytest.approx(expected_few, rel=1e-7)
    assert metrics.frechet_distance(few.mean(0), np.cov(few, rowvar=False), s2.mu, s2.sigma) == pytest.approx(
        expected_few, rel=1e-7)


def test_frechet_distance_bad_input():
    with pytest.raises(ValueError, match="different dimensions"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        metrics.frechet_distance(np.zeros(2), np.array([[1, 0], [0, np.nan]]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="expected"):
        metrics.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))


# ---------------------------------------------------------------------------------------------------------------
# Offline clean-fid plumbing with a feature network and reference statistics made here


class TinyFeatures(torch.nn.Module):
    """A fixed small feature network: 4×4 average pool of [0, 255] images, random linear map, tanh → 6 features."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.randn(48, 6, generator=g) / 48**0.5)

    def forward(self, x):  # (B, 3, H, W) in [0, 255]
        pooled = torch.nn.functional.adaptive_avg_pool2d(x / 127.5 - 1, 4).flatten(1)  # (B, 48)
        return torch.tanh(3 * pooled @ self.w)  # (B, 6)


def _images(n, shift, seed, res=16):
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, (n, 1, 1, 3)) * 160 + shift  # per-image colour → features vary between images
    noise = rng.normal(0, 30, (n, res, res, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)  # (n, res, res, 3)


def _write_folder(path, images):
    path.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(path / f"{i:05d}.png")
    return path


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    a, b = _images(24, 0, 1), _images(28, 60, 2)
    np.savez(root / "a.npz", images=a)
    return dict(a=a, b=b, dir_a=_write_folder(root / "a", a), dir_b=_write_folder(root / "b", b),
                npz_a=root / "a.npz", root=root)


CPU = torch.device("cpu")


@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow"])
def test_fid_folders_match_cleanfid(image_sets, mode):
    net = TinyFeatures()
    expected = cfid.compute_fid(str(image_sets["dir_a"]), str(image_sets["dir_b"]), mode=mode, num_workers=0,
                                batch_size=16, device=CPU, custom_feat_extractor=net, verbose=False)
    got = metrics.fid(image_sets["dir_a"], image_sets["dir_b"], mode=mode, feature_extractor=net, device="cpu")
    assert expected > 0.1  # the two sets differ
    # clean-fid averages float32 features in float32 (np.mean keeps the dtype); we average in float64: ~1e-7 apart.
    assert got == pytest.approx(expected, rel=1e-6)
    # An npz of the same images, the uint8 array itself (NHWC or NCHW) and a tensor give identical features.
    feats_a = metrics.image_features(image_sets["dir_a"], mode=mode, feature_extractor=net, device="cpu")
    for source in (image_sets["npz_a"], torch.from_numpy(image_sets["a"]).permute(0, 3, 1, 2)):
        np.testing.assert_array_equal(metrics.image_features(source, mode=mode, feature_extractor=net), feats_a)
    # The npz of the first set against the folder of the same images: FID 0.
    assert abs(metrics.fid(image_sets["npz_a"], image_sets["dir_a"], mode=mode, feature_extractor=net,
                           device="cpu")) < 1e-9


def test_fid_generator_against_named_dataset_stats(image_sets, tmp_path):
    net = TinyFeatures()
    # Reference statistics of a "data set" made here, in clean-fid's file layout, in a folder of our own.
    name = metrics.reference_stats_filename("cifar10", 16, "train", "clean")
    assert name == "cifar10_clean_train_16.npz"
    stats = metrics.make_reference_stats(image_sets["dir_b"], tmp_path / name, feature_extractor=net, device="cpu",
                                         kid=True, verbose=False)
    feats_b = cfid.get_folder_features(str(image_sets["dir_b"]), net, num_workers=0, batch_size=8, device=CPU,
                                       mode="clean", verbose=False)
    np.testing.assert_allclose(stats.mu, feats_b.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(np.load(tmp_path / name)["sigma"], np.cov(feats_b, rowvar=False), rtol=1e-12)
    np.testing.assert_array_equal(np.load(tmp_path / "cifar10_clean_train_16_kid.npz")["feats"], feats_b)

    def gen(z):  # clean-fid's generator contract: z (B, z_dim) → images (B, 3, H, W) in [0, 255]
        return (z.view(-1, 3, 4, 4).repeat_interleave(4, 2).repeat_interleave(4, 3) * 40 + 128).clamp(0, 255).round()

    # clean-fid's generator loop and Fréchet distance on its features (its compute_fid cannot read our folder).
    torch.manual_seed(7)
    feats_gen = cfid.get_model_features(gen, net, mode="clean", z_dim=48, num_gen=24, batch_size=16, device=CPU,
                                        verbose=False).astype(np.float64)
    expected = cfid.frechet_distance(feats_gen.mean(0), np.cov(feats_gen, rowvar=False), stats.mu, stats.sigma)
    state = torch.get_rng_state()
    got = metrics.fid(gen, dataset="cifar10", dataset_res=16, stats_folder=tmp_path, feature_extractor=net,
                      device="cpu", num_gen=24, z_dim=48, seed=7, batch_size=16)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert got == pytest.approx(expected, rel=1e-9)
    # The statistics file can also be passed directly.
    assert metrics.fid(gen, tmp_path / name, feature_extractor=net, device="cpu", num_gen=24, z_dim=48, seed=7,
                       batch_size=16) == pytest.approx(got, rel=1e-12)


def _unbiased_mmd2_cubic(x, y):
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
    m = len(x)
    return ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()


def test_kid_matches_direct_unbiased_mmd(image_sets, tmp_path):
    net = TinyFeatures()
    a40, b40 = image_sets["a"], image_sets["b"][:24]
    fa = metrics.image_features(a40, feature_extractor=net, device="cpu")
    fb = metrics.image_features(b40, feature_extractor=net, device="cpu")
    # With equal set sizes ≤ 1000 every clean-fid subset is a permutation of the full sets: the estimate is exact.
    expected = _unbiased_mmd2_cubic(fb.astype(np.float64), fa.astype(np.float64))
    assert metrics.kid(a40, b40, feature_extractor=net, device="cpu") == pytest.approx(expected, rel=1e-6)
    assert expected > 1e-3
    np.savez(tmp_path / "svhn_clean_train_16_kid.npz", feats=fb)
    assert metrics.kid(a40, dataset="svhn", dataset_res=16, stats_folder=tmp_path, feature_extractor=net,
                       device="cpu") == pytest.approx(expected, rel=1e-6)


def test_missing_assets_say_what_to_place_where(image_sets, tmp_path):
    with pytest.raises(metrics.MissingAssetError) as e:
        metrics.fid(image_sets["dir_a"], image_sets["dir_b"], inception_dir=tmp_path, device="cpu")
    msg = str(e.value)
    assert str(tmp_path / "inception-2015-12-05.pt") in msg and "https://nvlabs-fi-cdn.nvidia.com" in msg
    with pytest.raises(metrics.MissingAssetError) as e:
        metrics.fid(image_sets["dir_a"], dataset="cifar10", dataset_res=32, mode="legacy_tensorflow",
                    stats_folder=tmp_path, feature_extractor=TinyFeatures(), device="cpu")
    msg = str(e.value)
    assert str(tmp_path / "cifar10_legacy_tensorflow_train_32.npz") in msg and "clean-fid/stats/" in msg
    with pytest.raises(metrics.MissingAssetError, match="cifar10_clean_test_32_kid.npz"):
        metrics.kid(image_sets["a"], dataset="cifar10", dataset_res=32, dataset_split="test", stats_folder=tmp_path,
                    feature_extractor=TinyFeatures(), device="cpu")
    with pytest.raises(metrics.MissingAssetError, match="inception-2015-12-05.pt"):
        metrics.inception_score(image_sets["a"], inception_dir=tmp_path, device="cpu")
    # Default locations are clean-fid's own.
    assert metrics.stats_dir().parent.name == "cleanfid"


def test_fid_bad_input(image_sets, tmp_path):
    net = TinyFeatures()
    with pytest.raises(ValueError, match="to_uint8"):
        metrics.fid(np.zeros((4, 3, 8, 8), np.float32), image_sets["a"], feature_extractor=net, device="cpu")
    with pytest.raises(ValueError, match="mode"):
        metrics.fid(image_sets["a"], image_sets["b"], mode="legacy_pytorch", feature_extractor=net)
    with pytest.raises(ValueError, match="exactly one"):
        metrics.fid(image_sets["a"], image_sets["b"], dataset="cifar10", dataset_res=32, feature_extractor=net)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        metrics.fid(tmp_path / "empty", image_sets["a"], feature_extractor=net, device="cpu")
    with pytest.raises(ValueError, match="num_gen and z_dim"):
        metrics.fid(lambda z: z, image_sets["a"], feature_extractor=net, device="cpu")
    assert metrics.to_uint8(torch.tensor([-1.0, 0.0, 1.0, 2.0])).tolist() == [0, 128, 255, 255]


def test_inception_score_closed_form(image_sets):
    k, s = 4, 3.0
    # Softmax of s·onehot: every row has the same entropy h, and a balanced set has the uniform marginal.
    p_hi = math.exp(s) / (math.exp(s) + k - 1)
    p_lo = 1 / (math.exp(s) + k - 1)
    h = -(p_hi * math.log(p_hi) + (k - 1) * p_lo * math.log(p_lo))
    expected = k * math.exp(-h)

    class Classifier(torch.nn.Module):  # class = index of the image's mean colour bucket (set up below)
        def forward(self, x):  # (B, 3, H, W) in [0, 255]
            cls = (x.mean(dim=(1, 2, 3)) // 64).long().clamp(0, k - 1)
            return torch.softmax(s * torch.nn.functional.one_hot(cls, k).double(), dim=1)

    images = np.repeat(np.arange(k, dtype=np.uint8) * 64 + 20, 10)[:, None, None, None] * np.ones((1, 8, 8, 3),
                                                                                                  np.uint8)
    mean, std = metrics.inception_score(images[np.argsort(np.arange(40) % 10, kind="stable")], splits=10,
                                        classifier=Classifier(), device="cpu")
    assert mean == pytest.approx(expected, rel=1e-9) and std < 1e-9
    # Identical predictions → IS = 1; bad probabilities → error.
    assert metrics.inception_score_from_probs(np.full((20, 5), 0.2), splits=2) == pytest.approx((1.0, 0.0))
    with pytest.raises(ValueError, match="sum to 1"):
        metrics.inception_score_from_probs(np.ones((20, 5)), splits=2)


class _StandInLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 2048, 1)  # seeded by the autouse fixture

    def forward(self, x):  # (B, 3, 299, 299) normalised to [-1, 1]
        return torch.tanh(self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 1)))  # (B, 2048, 1, 1)


class _StandInInception(torch.nn.Module):
    """The TorchScript interface of NVIDIA's inception-2015-12-05.pt (``layers``, ``return_features``,
    ``no_output_bias``, resize inside), with a tiny network, to test the loading and wiring without the real file."""

    def __init__(self):
        super().__init__()
        self.layers = _StandInLayers()

    def forward(self, x, return_features: bool = False, no_output_bias: bool = False):
        x = torch.nn.functional.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
        feats = self.layers((x - 128) / 128).view(-1, 2048)
        if return_features:
            return feats
        logits = 5 * feats[:, :1008] + (0.0 if no_output_bias else 1.0) * torch.arange(1008.0) / 1008
        return torch.softmax(logits, dim=1)


def test_inception_file_loading_and_wiring(image_sets, tmp_path):
    torch.jit.script(_StandInInception().requires_grad_(False)).save(str(tmp_path / metrics.INCEPTION_FILE))
    ref = torch.jit.load(str(tmp_path / metrics.INCEPTION_FILE))
    x = torch.from_numpy(image_sets["a"]).permute(0, 3, 1, 2).float()  # (N, 3, 16, 16) in [0, 255]
    # legacy_tensorflow: native-size images into the network with return_features=True.
    got = metrics.image_features(image_sets["a"], mode="legacy_tensorflow", inception_dir=tmp_path, device="cpu")
    np.testing.assert_allclose(got, ref(x, return_features=True).numpy(), rtol=1e-5, atol=1e-6)
    # clean: clean-fid's PIL bicubic resize to 299 outside, then the layers on (x − 128)/128.
    wrapper = InceptionV3W(str(tmp_path), download=False, resize_inside=False)
    expected = cfid.get_folder_features(str(image_sets["dir_a"]), wrapper, num_workers=0, device=CPU, mode="clean",
                                        verbose=False)
    got = metrics.image_features(image_sets["dir_a"], mode="clean", inception_dir=tmp_path, device="cpu")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # Inception Score: softmax without the output bias, at native size.
    probs = ref(x, no_output_bias=True).double().numpy()
    expected = metrics.inception_score_from_probs(probs, splits=2)
    assert metrics.inception_score(image_sets["a"], splits=2, inception_dir=tmp_path, device="cpu") == pytest.approx(
        expected, rel=1e-5)
    assert expected != pytest.approx(metrics.inception_score_from_probs(ref(x).double().numpy(), splits=2))


@pytest.mark.skipif(not (metrics.inception_dir() / metrics.INCEPTION_FILE).is_file(),
                    reason="Inception weights not placed (see get.metrics.inception_path)")
def test_real_inception_when_present(image_sets):
    feats = metrics.image_features(image_sets["a"][:8], mode="legacy_tensorflow", device="cpu")
    assert feats.shape == (8, 2048) and np.isfinite(feats).all()
    mean, _ = metrics.inception_score(image_sets["a"][:20], splits=2, device="cpu")
    assert 1.0 <= mean <= 1008


# ---------------------------------------------------------------------------------------------------------------
# Exact metrics of the analytic teacher


def _mixture(num_components=3, mean_scale=1.0, **kw):
    from get.mixture import MixtureTeacher

    return MixtureTeacher(resolution=4, channels=3, num_components=num_components, rank=3, mean_scale=mean_scale,
                          factor_scale=0.2, diag_scale=0.05, max_frequency=2, **kw)


def _fd_bias(teacher, n, fourth_moments=None):
    """First-order E[FD] of n exact samples: (tr Σ + Σ_ij Var(y_i y_j) / (2(λ_i + λ_j))) / n, y in Σ's eigenbasis
    (‖μ̂ − μ‖² gives tr Σ / n; the Bures term is quadratic in Σ̂ − Σ). Gaussian: Var(y_i y_j) = λ_i λ_j (1 + δ_ij)."""
    lam, v = np.linalg.eigh(teacher.covariance().numpy())
    if fourth_moments is None:
        var = np.outer(lam, lam) * (1 + np.eye(len(lam)))
    else:  # estimated from a large exact sample
        y = (fourth_moments.reshape(len(fourth_moments), -1).numpy() - teacher.mean().reshape(-1).numpy()) @ v
        var = (y**2).T @ (y**2) / len(y) - np.diag(lam) ** 2
    return (lam.sum() + (var / (2 * (lam[:, None] + lam[None, :]))).sum()) / n


def test_pixel_fd_of_exact_samples_has_the_predicted_bias():
    gen = torch.Generator().manual_seed(0)

    def mean_fd(teacher, n, reps):  # average FD of `reps` independent sets of n exact samples
        ref = metrics.GaussianReference(teacher.mean().reshape(-1).numpy(), teacher.covariance().numpy())
        x = teacher.sample(n * reps, generator=gen)[0].reshape(reps, n, -1).numpy()
        return np.mean([ref.frechet_distance(xi) for xi in x]), ref

    gauss = _mixture(num_components=1)  # one component: a Gaussian, closed-form bias
    got, _ = mean_fd(gauss, 500, 200)
    assert got == pytest.approx(_fd_bias(gauss, 500), rel=0.1)  # standard error of the mean ≈ 3%
    # A mixture: the same first-order formula with fourth moments of a large exact sample.
    mix = _mixture(mean_scale=0.5)
    got, ref = mean_fd(mix, 1000, 100)
    assert got == pytest.approx(_fd_bias(mix, 1000, mix.sample(40_000, generator=gen)[0]), rel=0.2)  # s.e.m. ≈ 5%
    # A shift s changes only the mean term: FD(x + s) = FD(x) + ‖s‖² + 2 sᵀ(μ̂ − μ).
    x = mix.sample(1000, generator=gen)[0].reshape(1000, -1).numpy()
    s = np.full(x.shape[1], 0.05)
    expected = ref.frechet_distance(x) + s @ s + 2 * s @ (x.mean(0) - ref.mu)
    assert ref.frechet_distance(x + s) == pytest.approx(expected, rel=1e-9)


def test_mixture_evaluator_exact_samples_and_collapse():
    mix = _mixture()
    ev = metrics.MixtureEvaluator(mix, n_ref=2000, batch_size=512)
    x, comp = mix.sample(3000, generator=torch.Generator().manual_seed(1))
    exact = ev(x[:1500])
    assert exact["n"] == 1500
    assert 0 < exact["fd_pixel"] < 3 * _fd_bias(mix, 1500, x)
    assert exact["modes_covered"] == 3 and exact["mode_tv"] < 0.05
    assert exact["precision"] == pytest.approx(0.99, abs=0.01)
    # Samples of component 0 only: coverage concentrated on it, each sample still precise.
    one = ev(x[comp == 0])
    assert one["mode_shares"][0] > 0.999 and one["modes_covered"] == 1
    assert one["mode_tv"] == pytest.approx(2 / 3, abs=1e-3)
    assert one["precision"] > 0.97
    assert one["fd_pixel"] > 20 * exact["fd_pixel"] and one["fd_feature"] > 20 * exact["fd_feature"]
    # The data mean: one image repeated, far from every component → zero precision, huge distance.
    mean = ev(mix.mean().expand(100, -1, -1, -1))
    assert mean["precision"] == 0 and mean["log_prob"] < exact["log_prob"] - 1
    assert mean["fd_pixel"] == pytest.approx(np.trace(mix.covariance().numpy()), rel=1e-9)  # Δμ = 0, Σ̂ = 0


def test_mixture_log_prob_closed_form_and_mse():
    gauss = _mixture(num_components=1)
    ev = metrics.MixtureEvaluator(gauss, n_ref=500)
    x, _ = gauss.sample(4000, generator=torch.Generator().manual_seed(2))
    d = x[0].numel()
    _, logdet = np.linalg.slogdet(gauss.covariance().numpy())
    entropy_per_dim = 0.5 * (d * math.log(2 * math.pi) + logdet + d) / d  # E[−log p] / D of a Gaussian
    out = ev(x, targets=x + 0.1)
    assert out["log_prob"] == pytest.approx(-entropy_per_dim, abs=4 * math.sqrt(d / 2 / 4000) / d)
    assert out["mse"] == pytest.approx(0.01, rel=1e-9)
    assert ev(x, targets=x)["mse"] == 0


def test_mixture_class_accuracy_and_bad_input():
    mix = _mixture(conditional=True)
    ev = metrics.MixtureEvaluator(mix, n_ref=500)
    labels = torch.arange(300) % 3
    x, got = mix.sample(300, generator=torch.Generator().manual_seed(3), class_labels=labels)
    assert torch.equal(got, labels)
    assert ev(x, class_labels=labels)["class_accuracy"] > 0.999
    assert ev(x, class_labels=(labels + 1) % 3)["class_accuracy"] < 0.001
    with pytest.raises(ValueError, match="non-finite"):
        ev(torch.full((4, 3, 4, 4), float("nan")))
    with pytest.raises(ValueError, match=r"\(N, 3, 4, 4\)"):
        ev(torch.zeros(4, 3, 8, 8))
    with pytest.raises(ValueError, match="paired"):
        ev(x, targets=x[:10])
    with pytest.raises(TypeError, match="MixtureTeacher"):
        metrics.MixtureEvaluator(TinyFeatures())


def test_random_conv_features_fixed_by_seed():
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    a, b, c = metrics.RandomConvFeatures(3, seed=0), metrics.RandomConvFeatures(3, seed=0), metrics.RandomConvFeatures(
        3, seed=1)
    assert a(x).shape == (5, a.dim) == (5, 736)
    assert torch.equal(a(x), b(x)) and not torch.allclose(a(x), c(x))
    # The documented definition (He-normal from a CPU generator seeded with `seed`), so the space cannot drift.
    g = torch.Generator().manual_seed(0)
    assert torch.equal(a.weights[0], torch.randn(32, 3, 3, 3, generator=g) * math.sqrt(2 / 27))
    assert torch.equal(a.weights[1], torch.randn(64, 32, 3, 3, generator=g) * math.sqrt(2 / (9 * 32)))
