"""DMD / DMD2 (get.distill.dmd): each loss against values computed by hand on tiny float64 cases, the GAN head's
official layout, the schedules, and train/train_dmd.py end to end with exact resume."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pair_sets import make_pairs
from safetensors.torch import load_file

from get.distill import dmd
from get.edm.precond import EDMPrecond
from get.mixture import MixtureTeacher
from get.models import GET, GET_models
from get.teachers import save_teacher
from get.training.cli import UserError
from get.training.guards import TrainingDivergedError
from get.training.logs import read_stats

REPO = Path(__file__).resolve().parents[1]


def gaussian_score(mean: float, var: float):
    """The exact EDM denoiser of data N(mean, var I): D(x; sigma) = (var x + sigma^2 mean) / (var + sigma^2)."""

    def score(x, sigma, class_labels=None):
        s2 = torch.as_tensor(sigma, dtype=x.dtype).view(-1, 1, 1, 1) ** 2
        return (var * x + s2 * mean) / (var + s2)

    return score


def test_karras_grid_and_dm_range():
    grid = dmd.karras_sigmas()
    assert grid.dtype == torch.float64 and grid.shape == (1000,)
    assert bool((grid[1:] > grid[:-1]).all())
    lo, hi = 0.002 ** (1 / 7), 80 ** (1 / 7)
    for i in (0, 20, 500, 980, 999):
        assert grid[i].item() == pytest.approx((lo + i / 999 * (hi - lo)) ** 7, rel=1e-12)
    # docs/DISTILL.md: index 20 -> 0.003232, 980 -> 72.05.
    assert grid[20].item() == pytest.approx(0.003232, abs=5e-7)
    assert grid[980].item() == pytest.approx(72.05, abs=5e-3)
    assert dmd.index_range(1000, 0.02, 0.98) == (20, 980)
    assert dmd.index_range(1000, 0.0, 1.0) == (0, 999)
    torch.manual_seed(0)
    sigma = dmd.sample_sigma(4000, grid, 20, 980)
    assert sigma.dtype == torch.float32
    assert sigma.min().item() >= grid[20].float().item() and sigma.max().item() <= grid[980].float().item()
    assert torch.isin(sigma, grid[[20, 980]].float()).any()  # both ends reachable (inclusive range)


def test_dm_gradient_by_hand():
    x = torch.tensor([[1.0, -2.0], [0.5, 0.5]], dtype=torch.float64).view(2, 1, 1, 2)
    real = torch.tensor([[0.5, -1.0], [0.0, 1.0]], dtype=torch.float64).view(2, 1, 1, 2)
    fake = torch.tensor([[0.8, -0.4], [0.25, 0.5]], dtype=torch.float64).view(2, 1, 1, 2)
    g = dmd.dm_gradient(x, real, fake)
    # sample 0: mean|x - real| = (0.5 + 1) / 2 = 0.75, fake - real = (0.3, 0.6); sample 1: 0.5, (0.25, -0.5)
    expected = torch.tensor([[0.4, 0.8], [0.5, -1.0]], dtype=torch.float64).view(2, 1, 1, 2)
    torch.testing.assert_close(g, expected, rtol=0, atol=1e-15)
    # x on the real prediction: 0/0 is replaced by 0 as in the official code, never NaN.
    g0 = dmd.dm_gradient(real, real, real)
    assert bool((g0 == 0).all())


def test_surrogate_loss_value_and_gradient():
    x = torch.tensor([0.3, -0.2, 1.0, 0.0], dtype=torch.float64).view(1, 1, 2, 2).requires_grad_()
    g = torch.tensor([0.4, 0.8, -1.2, 2.0], dtype=torch.float64).view(1, 1, 2, 2)
    loss = dmd.surrogate_loss(x, g)
    assert loss.item() == pytest.approx(0.5 * (0.16 + 0.64 + 1.44 + 4.0) / 4, rel=1e-14)
    loss.backward()
    torch.testing.assert_close(x.grad, g / 4, rtol=0, atol=1e-16)


def test_distribution_matching_loss_by_hand():
    # Real data N(0, 0.25), fake N(0.1, 1); x = (0.3, -0.2), sigma = 1, noise (0.5, 1.0) -> x_sigma = (0.8, 0.8).
    x = torch.tensor([0.3, -0.2], dtype=torch.float64).view(1, 1, 1, 2).requires_grad_()
    noise = torch.tensor([0.5, 1.0], dtype=torch.float64).view(1, 1, 1, 2)
    sigma = torch.tensor([1.0], dtype=torch.float64)
    loss, g = dmd.distribution_matching_loss(x, gaussian_score(0.0, 0.25), gaussian_score(0.1, 1.0), sigma, noise)
    # D_real = 0.2 * 0.8 = 0.16, D_fake = (0.8 + 0.1) / 2 = 0.45, mean|x - D_real| = (0.14 + 0.36) / 2 = 0.25.
    torch.testing.assert_close(g, torch.full_like(x, 1.16), rtol=0, atol=1e-14)
    assert loss.item() == pytest.approx(0.5 * 1.16 ** 2, rel=1e-13)
    loss.backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.58), rtol=0, atol=1e-14)


def test_denoising_losses_by_hand():
    assert dmd.edm_loss_weight(torch.tensor([0.5, 2.0], dtype=torch.float64)).tolist() == [8.0, 4.25]
    denoised = torch.tensor([0.5, 0.1], dtype=torch.float64).view(2, 1, 1, 1)
    target = torch.tensor([0.3, 0.5], dtype=torch.float64).view(2, 1, 1, 1)
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    # (8 * 0.04 + 4.25 * 0.16) / 2
    assert dmd.denoising_loss(denoised, target, sigma).item() == pytest.approx((0.32 + 0.68) / 2, rel=1e-13)
    # Fake-score loss: D_fake of N(0, 1) data at sigma 1 on x = 0.6, noise 0.4 -> x_sigma = 1, D = 0.5;
    # lambda(1) = 1 + 4 = 5; 5 * (0.5 - 0.6)^2 = 0.05. The target is detached.
    x = torch.tensor([0.6], dtype=torch.float64).view(1, 1, 1, 1).requires_grad_()
    loss = dmd.fake_score_loss(gaussian_score(0.0, 1.0), x, torch.tensor([1.0], dtype=torch.float64),
                               torch.tensor([0.4], dtype=torch.float64).view(1, 1, 1, 1))
    assert loss.item() == pytest.approx(0.05, rel=1e-13)
    assert not loss.requires_grad


def test_gan_losses_by_hand():
    logits_real = torch.tensor([0.0, 2.0], dtype=torch.float64)
    logits_fake = torch.tensor([1.0, -1.0], dtype=torch.float64)
    sp = lambda v: math.log1p(math.exp(v))
    d = (sp(1.0) + sp(-1.0)) / 2 + (sp(0.0) + sp(-2.0)) / 2
    assert dmd.gan_discriminator_loss(logits_real, logits_fake).item() == pytest.approx(d, rel=1e-14)
    assert dmd.gan_discriminator_loss(logits_real, logits_fake).item() == pytest.approx(1.22329928, abs=1e-8)
    assert dmd.gan_generator_loss(logits_fake).item() == pytest.approx((sp(-1.0) + sp(1.0)) / 2, rel=1e-14)


def test_gan_head_official_layout():
    head = dmd.GANHead(768, 8)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {  # DMD2 edm_guidance.py cls_pred_branch for the 768 x 8 x 8 ADM bottleneck
        "cls_pred_branch.0.weight": (768, 768, 4, 4), "cls_pred_branch.0.bias": (768,),
        "cls_pred_branch.1.weight": (768,), "cls_pred_branch.1.bias": (768,),
        "cls_pred_branch.3.weight": (768, 768, 4, 4), "cls_pred_branch.3.bias": (768,),
        "cls_pred_branch.4.weight": (768,), "cls_pred_branch.4.bias": (768,),
        "cls_pred_branch.6.weight": (1, 768, 1, 1), "cls_pred_branch.6.bias": (1,),
    }
    assert head.cls_pred_branch[1].num_groups == 32 and head.cls_pred_branch[0].stride == (2, 2)
    # Small heads keep >= 4 channels per group: a 1-channel group after the 1x1 conv would output a constant.
    assert [dmd.GANHead(c, 4).cls_pred_branch[1].num_groups for c in (32, 12, 7)] == [8, 3, 1]
    assert head.cls_pred_branch[3].stride == (4, 4)
    assert head(torch.randn(2, 768, 8, 8)).shape == (2,)
    small = dmd.GANHead(64, 4)
    assert len(small.cls_pred_branch) == 4 and small(torch.randn(3, 64, 4, 4)).shape == (3,)
    assert dmd.GANHead(12, 16)(torch.randn(2, 12, 16, 16)).shape == (2,)  # 16 -> 8 -> 4 -> 1


def test_gan_logits_read_the_fake_bottleneck():
    fake = dmd.small_fake_score(8, 3, 0, model_channels=16, channel_mult=(1, 2), num_blocks=1)
    head = dmd.GANHead(32, 4)
    x, noise = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    sigma = torch.tensor([0.5, 3.0])
    expected = head(fake.bottleneck(x + sigma.view(-1, 1, 1, 1) * noise, sigma))
    torch.testing.assert_close(dmd.gan_logits(fake, head, x, sigma, noise), expected)


def test_generator_and_critic_loss_compositions():
    """One generator and one critic objective of each method, against the pieces computed by hand."""
    grid = dmd.karras_sigmas()
    x = torch.tensor([0.3, -0.2], dtype=torch.float64).view(1, 1, 1, 2).requires_grad_()
    real, fake = gaussian_score(0.0, 0.25), gaussian_score(0.1, 1.0)
    settings = dmd.DMDSettings("dmd")
    reg = torch.tensor(0.4, dtype=torch.float64)
    torch.manual_seed(3)
    loss, stats = dmd.generator_loss(settings, x, real, fake, grid, regression=reg)
    torch.manual_seed(3)  # the same draws by hand: k ~ U{20..980}, then the noise
    sigma = grid[torch.randint(20, 981, (1,))].float()
    noise = torch.randn_like(x)
    x_sigma = x.detach() + sigma.double() * noise
    d_real, d_fake = real(x_sigma, sigma.double()), fake(x_sigma, sigma.double())
    g = (d_fake - d_real) / (x.detach() - d_real).abs().mean()
    assert loss.item() == pytest.approx(0.5 * g.square().mean().item() + 0.25 * 0.4, rel=1e-6)
    assert stats["loss_reg"].item() == 0.4
    with pytest.raises(ValueError, match="regression"):
        dmd.generator_loss(settings, x, real, fake, grid)

    # DMD critic: the EDM-weighted denoising loss at k ~ U{0..999}.
    fake_net = dmd.small_fake_score(8, 3, 0, model_channels=16, channel_mult=(1, 2), num_blocks=1)
    xf = torch.randn(2, 3, 8, 8)
    torch.manual_seed(5)
    loss_c, _ = dmd.critic_loss(settings, xf, fake_net, grid)
    torch.manual_seed(5)
    sigma = grid[torch.randint(0, 1000, (2,))].float()
    noise = torch.randn_like(xf)
    lam = 1 / sigma ** 2 + 4
    ref = (lam.view(-1, 1, 1, 1) * (fake_net(xf + sigma.view(-1, 1, 1, 1) * noise, sigma) - xf) ** 2).mean()
    assert loss_c.item() == pytest.approx(ref.item(), rel=1e-5)

    # DMD2: generator adds 3e-3 softplus(-l_fake); critic adds 1e-2 (softplus(l_fake) + softplus(-l_real)).
    settings2 = dmd.DMDSettings("dmd2")
    assert settings2.ttur == 5 and settings.ttur == 1
    head = dmd.GANHead(32, 4)
    xg = torch.randn(2, 3, 8, 8, requires_grad=True)
    torch.manual_seed(7)
    loss_g, stats_g = dmd.generator_loss(settings2, xg, fake_net, fake_net, grid, head=head)
    assert stats_g["loss_dm"].item() == 0.0  # real == fake: zero gradient
    torch.manual_seed(7)
    torch.randint(20, 981, (2,)), torch.randn_like(xg)  # the DM draws
    sigma = grid[torch.randint(0, 1000, (2,))].float()
    logits = head(fake_net.bottleneck(xg.detach() + sigma.view(-1, 1, 1, 1) * torch.randn_like(xg), sigma))
    assert loss_g.item() == pytest.approx(3e-3 * F.softplus(-logits).mean().item(), rel=1e-5)
    xr = torch.randn(3, 3, 8, 8)
    torch.manual_seed(9)
    loss_d, stats_d = dmd.critic_loss(settings2, xg, fake_net, grid, head=head, x_real=xr)
    torch.manual_seed(9)
    s0 = grid[torch.randint(0, 1000, (2,))].float()
    dsm = dmd.fake_score_loss(fake_net, xg, s0, torch.randn_like(xg))
    s1 = grid[torch.randint(0, 1000, (2,))].float()
    lf = dmd.gan_logits(fake_net, head, xg.detach(), s1, torch.randn_like(xg))
    s2 = grid[torch.randint(0, 1000, (3,))].float()
    lr = dmd.gan_logits(fake_net, head, xr, s2, torch.randn_like(xr))
    ref = dsm + 1e-2 * (F.softplus(lf).mean() + F.softplus(-lr).mean())
    assert loss_d.item() == pytest.approx(ref.item(), rel=1e-5)
    assert set(stats_d) == {"loss_fake", "loss_gan_d", "logits_real", "logits_fake"}


def test_settings_validation_and_schedule():
    with pytest.raises(ValueError, match="method"):
        dmd.DMDSettings("sid")
    with pytest.raises(ValueError, match="ttur"):
        dmd.DMDSettings("dmd2", ttur=0)
    with pytest.raises(ValueError, match="decreasing"):
        dmd.DMDSettings("dmd2", gen_sigmas=(1.0, 80.0))
    with pytest.raises(ValueError, match="multi-step"):
        dmd.DMDSettings("dmd2", backward_simulation=True)
    assert [s for s in range(12) if dmd.is_generator_turn(s, 5)] == [0, 5, 10]
    assert all(dmd.is_generator_turn(s, 1) for s in range(4))


def test_backward_simulation_and_multistep_sampling_by_hand():
    sample_fn = lambda inp: 2.0 * inp  # a toy generator step
    z = torch.tensor([1.0, -1.0], dtype=torch.float64).view(1, 1, 1, 2)
    eps = [torch.tensor([0.5, 0.25], dtype=torch.float64).view(1, 1, 1, 2),
           torch.tensor([-1.0, 2.0], dtype=torch.float64).view(1, 1, 1, 2)]
    draws = iter(eps)
    randn_like = lambda t: next(draws)
    sigmas = (80.0, 4.0, 1.0)
    assert torch.equal(dmd.backward_simulation(sample_fn, z, sigmas, 0), z)
    # step 2: x0 = 2z = (2, -2); input_1 = x0/4 + eps0 = (1, -0.25); x0 = (2, -0.5); input_2 = x0/1 + eps1 = (1, 1.5)
    out = dmd.backward_simulation(sample_fn, z, sigmas, 2, randn_like)
    torch.testing.assert_close(out, torch.tensor([1.0, 1.5], dtype=torch.float64).view(1, 1, 1, 2))
    draws = iter(eps)
    out = dmd.sample_generator(sample_fn, z, sigmas, randn_like)
    torch.testing.assert_close(out, torch.tensor([2.0, 3.0], dtype=torch.float64).view(1, 1, 1, 2))
    with pytest.raises(ValueError, match="step"):
        dmd.backward_simulation(sample_fn, z, sigmas, 3)


def test_fake_score_copies_an_edm_teacher_with_dropout_off():
    teacher = EDMPrecond(img_resolution=8, img_channels=3, label_dim=2, model_type="SongUNet", model_channels=16,
                         channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.3).eval()
    teacher.requires_grad_(False)
    assert dmd.is_edm_network(teacher)
    fake = dmd.make_fake_score(teacher)
    assert fake.config["kwargs"]["dropout"] == 0.0 and fake is not teacher
    assert all(p.requires_grad for p in fake.parameters())
    x, sigma, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 2.0]), dmd.one_hot(torch.tensor([0, 1]), 2)
    torch.testing.assert_close(fake.train()(x, sigma, labels), teacher(x, sigma, labels))  # dropout 0 in training

    class Analytic:  # a teacher without a network: only the small DDPM++ fake score can model it
        resolution, channels, label_dim = 8, 3, 0

    small = dmd.make_fake_score(Analytic(), "scratch", model_channels=16, channel_mult=(1, 2))
    assert small.config["kwargs"]["model_type"] == "SongUNet" and small.bottleneck(x, sigma).shape == (2, 32, 4, 4)


def tiny_cifar_like_teacher(label_dim: int = 2) -> EDMPrecond:
    """An 8x8 DDPM++ teacher with EDM CIFAR-10's extras: augment_dim 9, dropout and label dropout in training."""
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=3, label_dim=label_dim, model_type="SongUNet", model_channels=16,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.1, label_dropout=0.2,
                     augment_dim=9)
    return net.eval().requires_grad_(False)


def test_fake_score_copy_drops_unused_layers_and_every_parameter_learns():
    teacher = tiny_cifar_like_teacher()
    fake = dmd.make_fake_score(teacher)
    kwargs = fake.config["kwargs"]
    assert (kwargs["augment_dim"], kwargs["dropout"], kwargs["label_dropout"]) == (0, 0.0, 0.0)
    assert fake.model.map_augment is None and teacher.model.map_augment is not None
    x, sigma, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 2.0]), dmd.one_hot(torch.tensor([0, 1]), 2)
    torch.testing.assert_close(fake.train()(x, sigma, labels), teacher(x, sigma, labels))  # same denoiser
    # One denoising step reaches every parameter: none is left for DDP to wait on.
    loss = dmd.fake_score_loss(fake, torch.randn(4, 3, 8, 8), torch.tensor([0.01, 0.5, 3.0, 60.0]),
                               torch.randn(4, 3, 8, 8), dmd.one_hot(torch.tensor([0, 1, 1, 0]), 2))
    loss.backward()
    missing = [name for name, p in fake.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"


DDP_CRITIC_WORKER = """
import argparse, json, pathlib
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from get import dist
from get.distill import dmd
from get.edm.precond import EDMPrecond

def main(args):
    dist.init("cpu")
    rank = dist.get_rank()
    torch.manual_seed(0)
    teacher = EDMPrecond(img_resolution=8, img_channels=3, label_dim=2, model_type="SongUNet", model_channels=16,
                         channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.1, label_dropout=0.2,
                         augment_dim=9).eval().requires_grad_(False)
    settings = dmd.DMDSettings("dmd2")
    fake = dmd.make_fake_score(teacher)
    head = dmd.GANHead(*dmd.bottleneck_shape(fake, 3, 8, 2)[:2])
    critic = DDP(dmd.Critic(settings, fake, head, dmd.karras_sigmas()))  # no find_unused_parameters
    opt = torch.optim.AdamW(critic.parameters(), lr=1e-4)
    torch.manual_seed(1 + rank)
    losses = []
    for _ in range(2):  # the second forward is where DDP fails on a parameter the first left without gradient
        labels = dmd.one_hot(torch.randint(2, (4,)), 2)
        loss, _ = critic(torch.randn(4, 3, 8, 8), labels, torch.randn(4, 3, 8, 8), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    checksum = sum(p.double().sum().item() for p in critic.parameters())
    out = pathlib.Path(args.out) / f"rank-{rank}.json"
    out.write_text(json.dumps({"losses": losses, "checksum": checksum}))
    dist.cleanup()

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    a = p.parse_args()
    dist.launch(main, 2, a)
"""


def test_fake_score_copy_trains_under_ddp_without_unused_parameters(tmp_path):
    """Two gloo ranks, DMD2's critic (fake copy of an augment_dim-9 teacher + head) in DDP, two updates."""
    script = tmp_path / "worker.py"
    script.write_text(DDP_CRITIC_WORKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert all(len(r["losses"]) == 2 and all(math.isfinite(v) for v in r["losses"]) for r in results)
    assert results[0]["checksum"] == results[1]["checksum"]  # gradients were averaged: the ranks agree


def test_residual_fake_score_starts_at_the_teacher():
    teacher = MixtureTeacher.preset("demo")
    fake = dmd.make_fake_score(teacher, "residual", model_channels=8)
    assert isinstance(fake, dmd.ResidualFakeScore)
    assert all(k.startswith("net.") for k in fake.state_dict())  # the frozen teacher is not saved
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.05, 4.0])
    d_teacher = teacher(x, sigma).float()
    # The correction's output layer starts at ~1e-5 of its fan-in init: D_fake = D_real up to ~1e-4.
    torch.testing.assert_close(fake(x, sigma), d_teacher, rtol=0, atol=1e-3)
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    expected = d_teacher + fake.net(x, sigma) - c_skip.view(-1, 1, 1, 1) * x
    torch.testing.assert_close(fake(x, sigma), expected, rtol=0, atol=1e-6)
    assert fake.bottleneck(x, sigma).shape == (2, 16, 4, 4)
    loss = dmd.fake_score_loss(fake, torch.randn(2, 3, 16, 16), sigma, torch.randn(2, 3, 16, 16))
    loss.backward()  # gradients reach the correction only
    assert all(p.grad is not None for p in fake.net.parameters() if p.requires_grad)
    assert dmd.make_fake_score(teacher, model_channels=8).config["class_name"] == "EDMPrecond"  # auto: scratch
    with pytest.raises(ValueError, match="copy"):
        dmd.make_fake_score(teacher, "copy")


# ----------------------------------------------------------------------------
# train/train_dmd.py end to end.



def _load_script(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scripts():
    return (_load_script("train_dmd", REPO / "train" / "train_dmd.py"),
            _load_script("generate", REPO / "data_gen" / "generate.py"))


@pytest.fixture(scope="module")
def edm_pairs(tmp_path_factory, scripts):
    """A tiny conditional EDM teacher (8x8 DDPM++) saved as a converted folder, and 32 pairs made from it."""
    _, generate = scripts
    root = tmp_path_factory.mktemp("edm")
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=3, label_dim=2, model_type="SongUNet", model_channels=16,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.1, name="tiny-edm")
    save_teacher(net, root / "teacher")
    assert generate.main(generate.parse_args(["--teacher", str(root / "teacher"), "--seeds", "0-31", "--steps", "2",
                                              "--outdir", str(root / "pairs"), "--batch", "32", "--grid", "0",
                                              "--device", "cpu"])) == 0
    return root


def _run_dmd(train_dmd, *argv):
    return train_dmd.main(train_dmd.parse_args([*argv, "--device", "cpu", "--log-every", "1", "--grid-seeds", "0-3"]))


def test_train_dmd2_resume_is_exact(edm_pairs, scripts, tmp_path, capsys):
    """DMD2 with real images from a .npz (and their labels): exact resume, the real stream in the checkpoint, the
    default warm-up recorded, the saved GET returning its trained (last) iterate; an EDM teacher needs --real."""
    train_dmd, _ = scripts
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "real.npz", arr_0=rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8),
             labels=rng.integers(0, 2, 10))
    common = ["--method", "dmd2", "--data", str(edm_pairs / "pairs"), "--teacher", str(edm_pairs / "teacher"),
              "--model", "GET-XXS/2", "--bs", "4", "--ttur", "2", "--ckpt-every", "2", "--sample-every", "2",
              "--eval-every", "0", "--lr", "1e-3", "--real", str(tmp_path / "real.npz")]
    _run_dmd(train_dmd, *common, "--outdir", str(tmp_path / "full"), "--steps", "4")
    _run_dmd(train_dmd, *common, "--outdir", str(tmp_path / "part"), "--steps", "2")
    _run_dmd(train_dmd, *common, "--outdir", str(tmp_path / "part"), "--steps", "4", "--resume")
    full, part = read_stats(tmp_path / "full"), read_stats(tmp_path / "part")
    assert [r["step"] for r in part] == [1, 2, 3, 4]
    keys = ("loss_dm", "loss_gan_g", "loss_fake", "loss_gan_d", "grad_norm_g", "grad_norm_c")
    for a, b in zip(full, part):
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}, a["step"]
    assert "loss_gan_g" in full[0] and "loss_gan_g" not in full[1] and "loss_gan_g" in full[2]  # TTUR 2
    ckpt_a, ckpt_b = tmp_path / "full/checkpoints/0000004", tmp_path / "part/checkpoints/0000004"
    for name in ("model", "fake", "head"):
        ta, tb = load_file(str(ckpt_a / f"{name}.safetensors")), load_file(str(ckpt_b / f"{name}.safetensors"))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    start = GET_models["GET-XXS/2"](input_size=8, num_classes=2)
    trained = GET.from_pretrained(ckpt_a)  # the checkpoint folder loads as a GET
    assert any(not torch.equal(a, b) for a, b in zip(start.state_dict().values(), trained.state_dict().values()))
    assert trained.config["deq"]["eval_select"] == "last"  # sample.py / from_pretrained return the trained iterate
    meta = json.loads((ckpt_a / "checkpoint.json").read_text())
    assert meta["modules"]["fake"]["kwargs"]["dropout"] == 0.0 and meta["optimizers"] == ["critic", "generator"]
    # 4 iterations of 4 images from 10 real ones (8 per epoch): epoch 1, position 8.
    assert meta["state"]["real"]["kind"] == "NpzImages" and meta["state"]["real"]["sampler"]["epoch"] == 1
    options = json.loads((tmp_path / "full/options.json").read_text())
    assert options["warmup"] == 500 and options["real_resolved"] == "NpzImages"
    assert [r["lr"] for r in read_stats(tmp_path / "full")] == pytest.approx([1e-3 / 500] * 2 + [2e-3 / 500] * 2)
    assert (tmp_path / "full/samples/0000004.png").is_file()
    # --init-fake: a new run starts its fake score and head from a checkpoint (with lr 0 they stay exactly so).
    _run_dmd(train_dmd, *common, "--outdir", str(tmp_path / "init"), "--steps", "1", "--init-fake", str(ckpt_a),
             "--lr", "0", "--fake-lr", "0")
    for name in ("fake", "head"):
        ta = load_file(str(ckpt_a / f"{name}.safetensors"))
        tb = load_file(str(tmp_path / "init/checkpoints/0000001" / f"{name}.safetensors"))
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name
    with pytest.raises(UserError, match="--resume"):
        _run_dmd(train_dmd, *common, "--outdir", str(tmp_path / "full"), "--steps", "6")
    no_real = common[:-2]
    with pytest.raises(UserError, match=r"^--real: teacher .* has no exact sampler.*--real pairs"):
        _run_dmd(train_dmd, *no_real, "--outdir", str(tmp_path / "none"), "--steps", "1")
    capsys.readouterr()
    _run_dmd(train_dmd, *no_real, "--outdir", str(tmp_path / "pairs"), "--steps", "1", "--real", "pairs")
    assert "Warning: --real pairs" in capsys.readouterr().out
    with pytest.raises(UserError, match=f"^--real {tmp_path / 'missing.npz'}: real data"):
        _run_dmd(train_dmd, *no_real, "--outdir", str(tmp_path / "bad"), "--steps", "1", "--real",
                 str(tmp_path / "missing.npz"))


def test_train_dmd_on_the_analytic_teacher(tmp_path, scripts):
    """DMD with the residual fake score: warm-up, regression on pairs, exact metrics, and teacher checks."""
    train_dmd, generate = scripts
    pairs = tmp_path / "pairs"
    assert generate.main(generate.parse_args(["--teacher", "mixture-demo", "--seeds", "0-15", "--steps", "2",
                                              "--outdir", str(pairs), "--batch", "16", "--grid", "0",
                                              "--device", "cpu"])) == 0
    # GET-XXS/2 offline-distilled stand-in: a fresh one saved as a pretrained folder.
    torch.manual_seed(0)
    GET_models["GET-XXS/2"](input_size=16).save_pretrained(tmp_path / "gen")
    _run_dmd(train_dmd, "--method", "dmd", "--data", str(pairs), "--generator", str(tmp_path / "gen"),
             "--outdir", str(tmp_path / "run"), "--bs", "4", "--steps", "3", "--fake-warmup", "1",
             "--fake-channels", "8", "--reg-loss", "l1", "--eval-every", "3", "--eval-seeds", "0-99",
             "--eval-ref", "200", "--sample-every", "3", "--ckpt-every", "3")
    stats = read_stats(tmp_path / "run")
    evals = [r for r in stats if "eval/fd_pixel" in r]
    assert [r["step"] for r in evals] == [0, 3] and evals[0]["eval/fd_pixel"] > 0
    train = [r for r in stats if "loss_fake" in r]
    assert "loss_dm" not in train[0] and "loss_reg" in train[1] and "loss_reg" in train[2]  # warm-up, then G
    options = json.loads((tmp_path / "run/options.json").read_text())
    assert options["fake_score_resolved"] == "scratch" and options["settings"]["reg_weight"] == 0.25
    assert options["warmup"] == 0 and options["reg_loss"] == "l1" and options["real_resolved"] is None
    assert GET.from_pretrained(tmp_path / "run/checkpoints/0000003").config["deq"]["eval_select"] == "last"
    # DMD2's real data defaults to the analytic teacher's exact samples, labels and all.
    _run_dmd(train_dmd, "--method", "dmd2", "--data", str(pairs), "--generator", str(tmp_path / "gen"),
             "--outdir", str(tmp_path / "run2"), "--bs", "4", "--steps", "1", "--fake-warmup", "0", "--ttur", "1",
             "--fake-channels", "8", "--eval-every", "0", "--sample-every", "1", "--ckpt-every", "1")
    meta = json.loads((tmp_path / "run2/checkpoints/0000001/checkpoint.json").read_text())
    assert meta["state"]["real"] == {"kind": "TeacherSamples", "seed": 42, "rank": 0, "batches": 1}
    with pytest.raises(UserError, match="not those of the teacher"):
        _run_dmd(train_dmd, "--method", "dmd", "--data", str(pairs), "--generator", str(tmp_path / "gen"),
                 "--teacher", "mixture", "--outdir", str(tmp_path / "bad"), "--steps", "1", "--bs", "4")


def test_regression_loss_defaults_to_lpips_and_names_missing_weights(tmp_path, monkeypatch):
    from test_losses import _write_lpips_files  # tests/ is on sys.path under pytest

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))  # no weights in the default place
    vgg, lin = str(tmp_path / "no-vgg16.pth"), str(tmp_path / "no-heads.pth")
    with pytest.raises(FileNotFoundError) as err:
        dmd.regression_loss(vgg_path=vgg, lin_path=lin)
    for part in (vgg, lin, "--lpips-vgg", "--lpips-lin", "--reg-loss l1"):
        assert part in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af.pth\) at .*empty-torch-home"):
        dmd.regression_loss()  # the default is LPIPS, not a silent L1
    with pytest.raises(ValueError, match="needs 3-channel images, these have 1.*--reg-loss l1"):
        dmd.regression_loss("lpips", channels=1)
    with pytest.raises(ValueError, match="--reg-loss 'l3'"):
        dmd.regression_loss("l3")
    # Asked for by name, L1 works without any weights.
    x, y = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    assert dmd.regression_loss("l1")(x, y).item() == pytest.approx(0.5)
    # train_dmd.py: LPIPS by default, a missing file is the one-line error naming it and the flags.
    train_dmd = _load_script("train_dmd", REPO / "train" / "train_dmd.py")
    with pytest.raises(UserError, match=f"weights are missing: .*{vgg}.*--lpips-vgg"):
        train_dmd.build_regression(train_dmd.parse_args(["--method", "dmd", "--data", "d", "--model", "GET-XXS/2",
                                                         "--lpips-vgg", vgg, "--lpips-lin", lin]), 3, "cpu")
    # With the files present, LPIPS it is.
    _, _, vgg, lin = _write_lpips_files(tmp_path)
    lpips = dmd.regression_loss(vgg_path=vgg, lin_path=lin)
    assert isinstance(lpips, torch.nn.Module) and lpips(x, x).item() == pytest.approx(0.0, abs=1e-6)


def test_train_dmd_guards_each_update_on_its_own(edm_pairs, scripts, tmp_path):
    """NaN pair images break one update each: DMD's regression (the generator) and DMD2's real images (the critic).
    The other update's good steps must not reset the count: --max-nonfinite stops the run; an interval whose
    critic updates were all skipped logs the generator's numbers only; the counts resume exactly."""
    train_dmd, _ = scripts
    nan_pairs = make_pairs(tmp_path / "nan", n=8, label_dim=2, nan=True)
    common = ["--data", str(nan_pairs), "--teacher", str(edm_pairs / "teacher"), "--model", "GET-XXS/2",
              "--bs", "4", "--eval-every", "0", "--sample-every", "100", "--ckpt-every", "2"]
    dmd2 = ["--method", "dmd2", "--ttur", "2", "--real", "pairs"]  # the NaN pair images as DMD2's real data
    with pytest.raises(TrainingDivergedError, match="2 non-finite generator updates in a row"):
        _run_dmd(train_dmd, *common, "--method", "dmd", "--reg-loss", "l1", "--outdir", str(tmp_path / "dmd"),
                 "--steps", "6", "--max-nonfinite", "2")
    stats = read_stats(tmp_path / "dmd")
    assert [(r["skipped_g"], r["skipped_c"], "loss_dm" in r, "loss_fake" in r) for r in stats] == [(1, 0, False, True)]

    run = tmp_path / "dmd2"
    _run_dmd(train_dmd, *common, *dmd2, "--outdir", str(run), "--steps", "2",
             "--max-nonfinite", "3")
    stats = read_stats(run)
    assert [(r["skipped_g"], r["skipped_c"], "loss_dm" in r, "loss_fake" in r) for r in stats] == [
        (0, 1, True, False), (0, 2, False, False)]
    meta = json.loads((run / "checkpoints" / "0000002" / "checkpoint.json").read_text())
    assert meta["state"]["guards"] == {"generator": {"in_row": 0, "total": 0}, "critic": {"in_row": 2, "total": 2}}
    # Another pair set of the same shape: refused unless --allow-data-change, before anything is written.
    with pytest.raises(UserError, match=f"^--data {edm_pairs / 'pairs'}: not the pair set the checkpoint"):
        _run_dmd(train_dmd, *[a if a != str(nan_pairs) else str(edm_pairs / "pairs") for a in common],
                 *dmd2, "--outdir", str(run), "--steps", "4", "--resume")
    assert not (run / "options-resume-0000002.json").exists()
    with pytest.raises(TrainingDivergedError, match="3 non-finite critic updates in a row \\(the last at step 3"):
        _run_dmd(train_dmd, *common, *dmd2, "--outdir", str(run), "--steps", "4",
                 "--max-nonfinite", "3", "--resume")


@pytest.mark.parametrize("argv, message", [
    (["--fake-channels", "0"], "--fake-channels must be at least 4"),
    (["--fake-channels", "34"], "--fake-channels must be at least 4 and give EDM's GroupNorm whole groups"),
    (["--fake-lr", "nan"], "--fake-lr must be a finite number >= 0, got nan"),
    (["--warmup", "-5"], "--warmup must be a finite number >= 0, got -5"),
    (["--gen-sigmas", "80,nan"], "argument --gen-sigmas: expected comma-separated finite numbers, got '80,nan'"),
    (["--eval-ref", "0"], "--eval-ref must be an integer >= 1, got 0"),
    (["--eval-seeds", "5-2"], "--eval-seeds '5-2': seeds: range '5-2' is decreasing"),
    (["--grid-seeds", ""], "--grid-seeds ''"),
    (["--fid-ref", "missing.npz"], "--fid-ref missing.npz: no such file"),
    (["--real", "pairs"], "--real pairs: only DMD2's discriminator reads real data"),
    (["--reg-loss", "auto"], "argument --reg-loss: invalid choice: 'auto'"),
])
def test_train_dmd_options_are_checked_naming_the_flag(scripts, argv, message, capsys):
    train_dmd, _ = scripts
    with pytest.raises(SystemExit):
        train_dmd.parse_args(["--method", "dmd", "--data", "d", "--model", "GET-XXS/2", *argv])
    assert capsys.readouterr().err.splitlines()[-1].split(": error: ")[1].startswith(message)
    assert train_dmd.fake_channels_ok(8) and train_dmd.fake_channels_ok(128) and not train_dmd.fake_channels_ok(132)


def test_iterate_choice_bench_measures_both_iterates(tmp_path):
    """bench/iterate_choice.py (the measurement in docs/DISTILL.md): shares of the selected iterate and the exact
    metrics of the selected and the last iterate, on a tiny fresh GET of the analytic teacher's shape."""
    bench = _load_script("iterate_choice", REPO / "bench" / "iterate_choice.py")
    torch.manual_seed(0)
    GET_models["GET-XXS/2"](input_size=16).save_pretrained(tmp_path / "gen")
    result = bench.main([str(tmp_path / "gen"), "--seeds", "0-99", "--eval-ref", "100"])
    shares = result["nstep_shares"]
    assert list(shares) == [1, 2, 3, 4, 5, 6] and sum(shares.values()) == pytest.approx(1.0)
    assert set(result["selected"]) == set(result["last"]) == set(bench.METRICS)
