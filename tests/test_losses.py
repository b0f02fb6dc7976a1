import math

import pytest
import torch
import torchvision
from torchdeq.loss import fp_correction as torchdeq_fp_correction

from get.losses import (
    LOSSES,
    LPIPS,
    fp_correction,
    fp_correction_weights,
    get_loss_fn,
    l1_loss,
    l2_loss,
    pseudo_huber_loss,
)


def test_fp_correction_weights_are_the_official_ones():
    w = fp_correction_weights(6)
    assert w == pytest.approx([0.32768, 0.4096, 0.512, 0.64, 0.8, 1.0], abs=1e-15)
    assert sum(w) == pytest.approx(3.68928, abs=1e-12)


@pytest.mark.parametrize("name", ["l1", "l2", "pseudo-huber"])
def test_fp_correction_matches_torchdeq(name):
    g = torch.Generator().manual_seed(1)
    preds = [torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(6)]
    target = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    crit = get_loss_fn(name)
    loss, per_state = fp_correction(crit, preds, target)
    ref, ref_values = torchdeq_fp_correction(crit, (preds, target), return_loss_values=True)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-14)
    assert per_state.tolist() == pytest.approx(ref_values, rel=1e-6)  # per_state is float32
    # And the unnormalised weighted sum by hand.
    by_hand = sum(0.8 ** (5 - k) * crit(p, target).item() for k, p in enumerate(preds))
    assert loss.item() == pytest.approx(by_hand, rel=1e-14)


def test_fp_correction_gradient_weights():
    # d loss / d pred_k of an L2 loss is 0.8^(5-k) * 2 (pred_k - target) / numel.
    preds = [torch.zeros(1, 1, 2, 2, dtype=torch.float64, requires_grad=True) for _ in range(6)]
    target = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    loss, _ = fp_correction(l2_loss, preds, target)
    loss.backward()
    for k, p in enumerate(preds):
        assert torch.allclose(p.grad, torch.full_like(p, -2 * 0.8 ** (5 - k) / 4))


def test_pixel_losses_by_hand():
    pred = torch.tensor([[[[1.0, -2.0], [0.5, 0.0]]]], dtype=torch.float64)  # (1, 1, 2, 2)
    target = torch.zeros_like(pred)
    assert l1_loss(pred, target).item() == pytest.approx((1 + 2 + 0.5) / 4)
    assert l2_loss(pred, target).item() == pytest.approx((1 + 4 + 0.25) / 4)
    # Per sample: sqrt(||d||² + c²) - c, then the batch mean.
    pred2 = torch.cat([pred, 2 * pred])  # (2, 1, 2, 2): squared norms 5.25 and 21
    target2 = torch.zeros_like(pred2)
    expected = ((math.sqrt(5.25 + 0.01) - 0.1) + (math.sqrt(21 + 0.01) - 0.1)) / 2
    assert pseudo_huber_loss(pred2, target2, c=0.1).item() == pytest.approx(expected, rel=1e-14)


def test_pseudo_huber_default_scale():
    # c = 0.00054 * sqrt(3 * 32 * 32); a tiny error behaves as ||d||² / (2c).
    c = 0.00054 * math.sqrt(3072)
    d = torch.zeros(1, 3, 32, 32, dtype=torch.float64)
    d[0, 0, 0, 0] = 1e-4
    assert pseudo_huber_loss(d, torch.zeros_like(d)).item() == pytest.approx(1e-8 / (2 * c), rel=1e-6)


def test_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss 'huber'"):
        get_loss_fn("huber")
    assert set(LOSSES) == {"l1", "l2", "pseudo-huber", "lpips"}


def test_lpips_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="VGG16 ImageNet weights.*not found at"):
        LPIPS(vgg_path=str(tmp_path / "none.pth"), lin_path=str(tmp_path / "none2.pth"))


def _write_lpips_files(tmp_path):
    vgg = torchvision.models.vgg
    features = vgg.make_layers(vgg.cfgs["D"])
    vgg_path, lin_path = tmp_path / "vgg16.pth", tmp_path / "lin.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, vgg_path)
    g = torch.Generator().manual_seed(0)
    channels = (64, 128, 256, 512, 512)
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(channels)}
    torch.save(lins, lin_path)
    return features, lins, str(vgg_path), str(lin_path)


def test_lpips_against_a_direct_computation(tmp_path):
    features, lins, vgg_path, lin_path = _write_lpips_files(tmp_path)
    lpips = LPIPS(vgg_path=vgg_path, lin_path=lin_path, resize=None).double()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    d = lpips(x, y)
    assert d.shape == (2,)
    # Reference: walk VGG16 layer by layer, tap relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (indices 3, 8, 15, 22, 29).
    features = features.double()
    # The lpips constants, stored in float32 as the lpips package does.
    shift = torch.tensor([-0.030, -0.088, -0.188]).double().view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).double().view(1, 3, 1, 1)

    def taps(img):
        h, out = (img - shift) / scale, []
        for i, layer in enumerate(features[:30]):  # the last max-pool is not used
            h = layer(h)
            if i in (3, 8, 15, 22, 29):
                out.append(h)
        return out

    ref = torch.zeros(2, dtype=torch.float64)
    for i, (a, b) in enumerate(zip(taps(x), taps(y))):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        w = lins[f"lin{i}.model.1.weight"].double()
        ref += ((a - b) ** 2 * w).sum(dim=1).mean(dim=(1, 2))
    torch.testing.assert_close(d, ref, rtol=1e-10, atol=1e-12)
    assert lpips(x, x).abs().max().item() < 1e-12
    # Through the loss factory: the batch mean, with a gradient to the prediction.
    loss_fn = get_loss_fn("lpips", vgg_path=vgg_path, lin_path=lin_path, resize=None).double()
    xr = x.float().requires_grad_(True)
    loss = loss_fn(xr, y.float())
    loss.backward()
    assert loss.item() == pytest.approx(ref.mean().item(), rel=1e-4)
    assert xr.grad is not None and torch.isfinite(xr.grad).all() and xr.grad.abs().sum() > 0
