"""Our EDM networks against the official layouts (tests/data/edm_keys/, docs/EDM.md) and the layer definitions.

Full-size networks are built on the 'meta' device (no memory, no init cost) for key, shape and count checks.
"""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from get.edm.layers import Conv2d, FourierEmbedding, GroupNorm, PositionalEmbedding, UNetBlock
from get.edm.networks import DhariwalUNet, SongUNet
from get.edm.precond import EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond
from get.teachers import Teacher

KEYS_DIR = Path(__file__).parent / "data" / "edm_keys"  # the official state-dict keys and shapes, one per line

DDPMPP = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
              channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2],
              augment_dim=9, dropout=0.13)
NCSNPP = dict(DDPMPP, embedding_type="fourier", encoder_type="residual", channel_mult_noise=2,
              resample_filter=[1, 3, 3, 1])
ADM = dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4], dropout=0.1)

# (key-list file or None, constructor kwargs, tensors in state dict, parameters) -- docs/EDM.md.
RELEASED = {
    "cifar10-cond-vp": ("cifar10_cond_vp_ddpmpp.txt", dict(img_resolution=32, img_channels=3, label_dim=10,
                                                           **DDPMPP), 427, 55_735_299),
    "cifar10-uncond-ve": ("cifar10_uncond_ve_ncsnpp.txt", dict(img_resolution=32, img_channels=3, label_dim=0,
                                                               **NCSNPP), 432, 56_397_827),
    "imagenet64-cond-adm": ("imagenet64_cond_adm.txt", dict(img_resolution=64, img_channels=3, label_dim=1000,
                                                            use_fp16=True, **ADM), 553, 295_899_267),
    "cifar10-cond-ve": (None, dict(img_resolution=32, img_channels=3, label_dim=10, **NCSNPP), 434, 56_400_643),
    "cifar10-uncond-vp": (None, dict(img_resolution=32, img_channels=3, label_dim=0, **DDPMPP), 425, 55_733_891),
    "ffhq64-uncond-vp": (None, dict(img_resolution=64, img_channels=3, **dict(DDPMPP, channel_mult=[1, 2, 2, 2],
                                                                              dropout=0.05)), 553, 61_805_571),
    "ffhq64-uncond-ve": (None, dict(img_resolution=64, img_channels=3, **dict(NCSNPP, channel_mult=[1, 2, 2, 2],
                                                                              dropout=0.05)), 563, 62_761_091),
}


def _meta(kwargs, cls=EDMPrecond):
    with torch.device("meta"):
        return cls(**kwargs)


def _read_keys(name):
    entries = []
    for line in (KEYS_DIR / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            entries.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    return entries


@pytest.fixture(scope="module")
def released():
    return {name: _meta(kwargs) for name, (_, kwargs, _, _) in RELEASED.items()}


@pytest.mark.parametrize("name", list(RELEASED))
def test_state_dict_matches_official_layout(released, name):
    key_file, _, n_tensors, n_params = RELEASED[name]
    net = released[name]
    ours = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
    assert len(ours) == n_tensors
    assert sum(p.numel() for p in net.parameters()) == n_params
    if key_file is not None:
        official = _read_keys(key_file)
        assert len(official) == n_tensors
        for (key, shape), (ref_key, ref_shape) in zip(ours, official):  # name by name, in order
            assert (key, shape) == (ref_key, ref_shape)
    # Structural rules for strict loading (§5).
    for key, _ in ours:
        assert key.startswith("model.")
        if key.endswith("resample_filter"):
            module = net.get_submodule(key.rsplit(".", 1)[0])
            assert module.up or module.down
    for module in net.modules():
        if isinstance(module, GroupNorm):
            assert module.num_groups == 32


def test_attention_blocks_and_heads(released):
    def heads(net):
        return {n: m.num_heads for n, m in net.named_modules() if isinstance(m, UNetBlock) and m.num_heads}

    ddpmpp = heads(released["cifar10-cond-vp"])
    assert sorted(ddpmpp) == sorted(["model.enc.16x16_block0", "model.enc.16x16_block1", "model.enc.16x16_block2",
                                     "model.enc.16x16_block3", "model.dec.8x8_in0", "model.dec.16x16_block4"])
    assert set(ddpmpp.values()) == {1}
    adm = heads(released["imagenet64-cond-adm"])
    assert len(adm) == 22
    assert adm["model.enc.32x32_block0"] == 6 and adm["model.enc.16x16_block1"] == 9 and adm["model.dec.8x8_in0"] == 12


def test_bottleneck_and_output_shapes_meta(released):
    with torch.device("meta"):
        for name, shape in [("cifar10-cond-vp", (2, 256, 8, 8)), ("imagenet64-cond-adm", (2, 768, 8, 8))]:
            net = released[name]
            R, L = net.img_resolution, net.label_dim
            x, sigma, labels = torch.randn(2, 3, R, R), torch.ones(2), torch.zeros(2, L)
            assert net.bottleneck(x, sigma, labels).shape == shape
            assert net(x, sigma, labels).shape == (2, 3, R, R)


# ---------------------------------------------------------------------------------------------------- layers


def test_conv_resampling_semantics():
    x = torch.randn(2, 3, 8, 8)
    down = Conv2d(3, 3, kernel=0, down=True)
    up = Conv2d(3, 3, kernel=0, up=True)
    assert set(down.state_dict()) == {"resample_filter"} and down.resample_filter.shape == (1, 1, 2, 2)
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(up(x), F.interpolate(x, scale_factor=2, mode="nearest"))
    taps = torch.tensor([1.0, 3, 3, 1])
    wide = Conv2d(3, 5, kernel=3, down=True, resample_filter=[1, 3, 3, 1], fused_resample=True)
    torch.testing.assert_close(wide.resample_filter[0, 0], torch.outer(taps, taps) / 64)
    assert wide(torch.randn(1, 3, 32, 32)).shape == (1, 5, 16, 16)
    assert "resample_filter" not in Conv2d(3, 5, kernel=3).state_dict()
    plain = Conv2d(3, 5, kernel=3)
    torch.testing.assert_close(plain(x), F.conv2d(x, plain.weight, plain.bias, padding=1))
    with pytest.raises(ValueError, match="mutually exclusive"):
        Conv2d(3, 3, kernel=3, up=True, down=True)


def test_attention_block_matches_explicit_per_head_computation():
    torch.manual_seed(1)
    C, heads, H = 16, 2, 4
    block = UNetBlock(C, C, emb_channels=8, attention=True, num_heads=heads, skip_scale=math.sqrt(0.5),
                      adaptive_scale=False, eps=1e-6, init_zero=dict(init_weight=0.5)).eval()
    for p in block.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    x, emb = torch.randn(2, C, H, H), torch.randn(2, 8)

    # Reference written from the layer's definition (docs/EDM.md) with explicit index arithmetic.
    def gn(m, t):
        return F.group_norm(t, m.num_groups, m.weight, m.bias, m.eps)

    def conv(m, t):
        return F.conv2d(t, m.weight, m.bias, padding=m.weight.shape[-1] // 2)

    h = conv(block.conv0, F.silu(gn(block.norm0, x)))
    h = F.silu(gn(block.norm1, h + (emb @ block.affine.weight.T + block.affine.bias)[:, :, None, None]))
    h = (conv(block.conv1, h) + x) * math.sqrt(0.5)
    qkv = conv(block.qkv, gn(block.norm2, h)).reshape(2, 3 * C, H * H)
    Ch = C // heads
    a = torch.zeros(2, C, H * H)
    for n in range(2):
        for head in range(heads):
            idx = torch.tensor([3 * (head * Ch + c) for c in range(Ch)])
            q, k, v = qkv[n, idx], qkv[n, idx + 1], qkv[n, idx + 2]  # (C_h, HW)
            w = torch.softmax(q.T @ k / math.sqrt(Ch), dim=1)  # (HW_i, HW_j), softmax over keys j
            a[n, head * Ch:(head + 1) * Ch] = v @ w.T
    ref = (conv(block.proj, a.reshape(2, C, H, H)) + h) * math.sqrt(0.5)
    torch.testing.assert_close(block(x, emb), ref, rtol=1e-5, atol=1e-5)


def test_embeddings():
    s = torch.tensor([0.3, -1.2])
    pos = PositionalEmbedding(8, endpoint=True)(s)
    freqs = (1 / 10000) ** (torch.arange(4) / 3)
    torch.testing.assert_close(pos, torch.cat([torch.cos(s[:, None] * freqs), torch.sin(s[:, None] * freqs)], 1))
    fourier = FourierEmbedding(8)
    assert set(fourier.state_dict()) == {"freqs"}
    angle = 2 * math.pi * s[:, None].double() * fourier.freqs.double()  # float32 angles reach ~1e2 rad: ulp ~1e-5
    torch.testing.assert_close(fourier(s).double(), torch.cat([angle.cos(), angle.sin()], 1), rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- preconditioners

TINY_SONG = dict(img_resolution=16, img_channels=3, label_dim=4, model_type="SongUNet", model_channels=32,
                 channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], augment_dim=9, dropout=0.2)
TINY_ADM = dict(img_resolution=16, img_channels=3, label_dim=5, model_type="DhariwalUNet", model_channels=64,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.2)


def test_edm_precond_coefficients_and_teacher_protocol():
    net = EDMPrecond(**TINY_SONG).eval()
    assert isinstance(net, Teacher) and (net.resolution, net.channels, net.label_dim) == (16, 3, 4)
    x, sigma = torch.randn(3, 3, 16, 16), torch.tensor([0.01, 1.0, 80.0])
    labels = F.one_hot(torch.tensor([0, 3, 1]), 4).float()
    s = sigma[:, None, None, None]
    F_x = net.model(x / (0.25 + s ** 2).sqrt(), sigma.log() / 4, labels)
    expected = 0.25 / (s ** 2 + 0.25) * x + s * 0.5 / (s ** 2 + 0.25).sqrt() * F_x
    torch.testing.assert_close(net(x, sigma, labels), expected, rtol=1e-5, atol=1e-5)
    # Missing labels are zeros (as EDM); float64 inputs give float32 outputs; a scalar sigma broadcasts.
    torch.testing.assert_close(net(x, sigma), net(x, sigma, torch.zeros(3, 4)))
    torch.testing.assert_close(net(x, sigma, torch.tensor([0, 3, 1])), net(x, sigma, labels), rtol=0, atol=0)
    with pytest.raises(ValueError, match="class_labels"):
        net(x, sigma, torch.ones(3, 5))
    out = net(x.double(), torch.tensor(2.0, dtype=torch.float64), labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, net(x, torch.full((3,), 2.0), labels))
    assert net.bottleneck(x, sigma, labels).shape == (3, 64, 8, 8)
    assert net.identity()["config"] == {"class_name": "EDMPrecond", "kwargs": {
        **{k: v for k, v in TINY_SONG.items()}, "use_fp16": False, "sigma_min": 0, "sigma_max": math.inf,
        "sigma_data": 0.5}}


@pytest.mark.parametrize("kwargs", [TINY_SONG, TINY_ADM], ids=["songunet", "dhariwalunet"])
def test_tiny_networks_train_and_eval(kwargs):
    net = EDMPrecond(**kwargs)
    with torch.no_grad():  # move off the zero init (ADM zero-initialises its output convs)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 3.0])
    labels = F.one_hot(torch.tensor([1, 2]), kwargs["label_dim"]).float()
    net.train()
    loss = (net(x, sigma, labels) - x).square().mean() + net.bottleneck(x, sigma, labels).square().mean()
    loss.backward()
    for name, p in net.named_parameters():  # map_augment is unused without augment labels (as in EDM sampling)
        assert (p.grad is None) == name.startswith("model.map_augment"), name
        assert p.grad is None or torch.isfinite(p.grad).all()
    torch.manual_seed(0)
    a = net(x, sigma, labels)
    assert not torch.equal(a, net(x, sigma, labels))  # dropout active in training mode
    net.eval()
    torch.testing.assert_close(net(x, sigma, labels), net(x, sigma, labels), rtol=0, atol=0)
    # Per-sample results do not depend on the batch (eval mode).
    torch.testing.assert_close(net(x[1:], sigma[1:], labels[1:]), net(x, sigma, labels)[1:], rtol=1e-5, atol=1e-5)


def test_vp_ve_iddpm_schedules():
    vp = _meta(dict(img_resolution=16, img_channels=3, model_channels=32, channel_mult=[1, 2], num_blocks=1,
                    attn_resolutions=[8]), VPPrecond)
    # EDM evaluates sigma(epsilon_t) on a float32 tensor: exp(~1e-6) - 1 cancels to 8 ulp, giving 2^-10 instead of the
    # float64 value 0.00100050 quoted in docs/EDM.md. The sampler clips to sigma_min = 0.002 anyway.
    assert vp.sigma_min == 2 ** -10 and vp.sigma_max == pytest.approx(152.16697, rel=1e-6)
    assert float(vp.sigma(torch.tensor(1e-5, dtype=torch.float64))) == pytest.approx(0.00100050, rel=1e-5)
    t = torch.tensor([1e-5, 0.3, 1.0], dtype=torch.float64)
    torch.testing.assert_close(vp.sigma_inv(vp.sigma(t)), t)
    ve = _meta(dict(img_resolution=16, img_channels=3, model_channels=32, channel_mult=[1, 2], num_blocks=1,
                    attn_resolutions=[8]), VEPrecond)
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100.0)
    iddpm = iDDPMPrecond(**dict(TINY_ADM, label_dim=0)).eval()
    assert list(iddpm.state_dict())[0] == "u" and iddpm.u.shape == (1001,) and iddpm.u.dtype == torch.float32
    assert float(iddpm.u[999]) == pytest.approx(0.0064223, rel=1e-4)
    assert float(iddpm.u[0]) == pytest.approx(20291.17, rel=1e-6)
    assert iddpm.model.out_channels == 6
    sigma = torch.tensor([iddpm.u[10] * 1.001, iddpm.u[500] * 0.999], dtype=torch.float64)
    torch.testing.assert_close(iddpm.round_sigma(sigma), iddpm.u[[10, 500]].double())
    assert iddpm.round_sigma(sigma, return_index=True).tolist() == [10, 500]
    x = torch.randn(2, 3, 16, 16)
    s = iddpm.u[[10, 500]]
    F_x = iddpm.model(x / (s[:, None, None, None] ** 2 + 1).sqrt(), 999 - torch.tensor([10.0, 500.0]), None)
    torch.testing.assert_close(iddpm(x, s), x - s[:, None, None, None] * F_x[:, :3], rtol=1e-5, atol=1e-5)


def test_constructor_errors():
    with pytest.raises(ValueError, match="model_type"):
        EDMPrecond(img_resolution=16, img_channels=3, model_type="UNet2DModel")
    for key, value in [("embedding_type", "learned"), ("encoder_type", "fancy"), ("decoder_type", "residual")]:
        with pytest.raises(ValueError, match=key):
            SongUNet(16, 3, 3, **{key: value})
    with pytest.raises(TypeError):
        DhariwalUNet(16, 3, 3, embedding_type="positional")
