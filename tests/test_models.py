"""GET model: official parameter counts and key layout, shapes, determinism, gradients, solver, files, errors."""

import argparse
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from get.deq import validate_deq_options
from get.models import GET, GET_models, NonFiniteError, count_parameters, create_model, sincos_pos_embed
from get.seeds import draw_inputs

KEYS_FILE = Path(__file__).parent / "data" / "get_official_keys.txt"  # the official GET-B/2 keys and shapes

# docs/GET.md: exact totals of the official model (pos_embed included), unconditional / conditional.
OFFICIAL_COUNTS = {
    "GET-T/2": (8_558_092, 8_565_772),
    "GET-M/2": (19_177_740, 19_189_260),
    "GET-S/2": (37_173_260, 37_188_620),
    "GET-B/2": (62_207_244, 62_230_284),
    "GET-B/2+": (83_481_612, 83_504_652),
    "ViT-B/2": (85_271_820, None),
    "ViT-L/2": (302_599_180, None),
}


def _official_key_lists():
    """Parses the spec's key file into {(name, 'uncond'|'cond'): [(key, shape), ...]}."""
    lists, current = {}, None
    for line in KEYS_FILE.read_text().splitlines():
        m = re.match(r"## (\S+) (uncond|cond): (\d+) tensors, ([\d,]+) parameters", line)
        if m:
            current = lists.setdefault((m.group(1), m.group(2)), [])
        elif current is not None and "\t" in line:
            key, shape = line.split("\t")
            current.append((key, tuple(int(s) for s in re.findall(r"\d+", shape))))
    return lists


OFFICIAL_KEYS = _official_key_lists()


def _meta_model(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


def _tiny(**kw):
    return GET_models["GET-XXS/2"](**{"input_size": 8, **kw})


@pytest.mark.parametrize("name", list(OFFICIAL_COUNTS))
def test_official_parameter_counts(name):
    uncond, cond = OFFICIAL_COUNTS[name]
    model = _meta_model(name)
    assert count_parameters(model) == uncond
    grid_tokens = 256
    assert count_parameters(model, trainable_only=True) == uncond - grid_tokens * model.hidden_size
    if cond is not None:
        assert count_parameters(_meta_model(name, num_classes=10)) == cond


def test_parameter_count_closed_form_of_spec():
    # docs/GET.md closed form, for the small configs too (same architecture, other sizes).
    for name in ("GET-XS/2", "GET-XXS/2", "GET-T/2"):
        m = _meta_model(name)
        D, L, r = m.hidden_size, m.depth, m.deq_mlp_ratio
        total = 256 * D + 13 * D + L * (12 * D**2 + 13 * D) + 9 * D**2 + 3 * ((4 + 2 * r) * D**2 + (9 + r) * D)
        assert count_parameters(m) == total + 14 * D + 12


@pytest.mark.parametrize("variant", sorted(OFFICIAL_KEYS))
def test_state_dict_matches_official_layout(variant):
    name, kind = variant
    model = _meta_model(name, num_classes=10 if kind == "cond" else 0)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == OFFICIAL_KEYS[variant]  # same names, shapes and order (= AdamW param index order)


def test_official_state_dict_loads_strictly_and_runs():
    # A state dict built from the spec's key list (random values) loads strictly and gives finite images.
    keys = OFFICIAL_KEYS[("GET-T/2", "cond")]
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) * 0.02 for k, shape in keys}
    model = GET_models["GET-T/2"](num_classes=10)
    model.load_state_dict(sd, strict=True)
    out = model(torch.randn(2, 3, 32, 32), torch.tensor([1, 9]))
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


def test_pos_embed_closed_form():
    D, G = 16, 4
    table = sincos_pos_embed(D, G)
    Q = D // 4
    for i, j, m in [(0, 0, 0), (1, 3, 2), (3, 2, 3)]:
        w = 10000.0 ** (-m / Q)
        t = G * i + j
        assert table[t, m] == pytest.approx(np.sin(j * w), abs=1e-15)
        assert table[t, Q + m] == pytest.approx(np.cos(j * w), abs=1e-15)
        assert table[t, 2 * Q + m] == pytest.approx(np.sin(i * w), abs=1e-15)
        assert table[t, 3 * Q + m] == pytest.approx(np.cos(i * w), abs=1e-15)


def test_fresh_model_outputs_zero_and_unpatchify_order():
    model = _tiny().eval()
    assert model(torch.randn(2, 3, 8, 8)).abs().max() == 0  # zero-initialised final linear
    torch.nn.init.normal_(model.final_layer.linear.weight)
    ops = model._ops(torch.device("cpu"))
    z = torch.randn(1, 16, model.hidden_size)
    y = model.final_layer(z, ops)  # (1, 16, 12)
    img = model.decode(z, ops)  # (1, 3, 8, 8)
    # image[b, ch, 2i+p, 2j+q] = y[b, G*i+j, 6p + 3q + ch] (docs/GET.md), G = 4 here
    for i, j, p, q, ch in np.ndindex(4, 4, 2, 2, 3):
        assert img[0, ch, 2 * i + p, 2 * j + q] == y[0, 4 * i + j, 6 * p + 3 * q + ch]


@pytest.mark.parametrize(
    "kw",
    [
        dict(input_size=12, in_channels=1),
        dict(input_size=16, in_channels=4, num_classes=7),
        dict(input_size=8, patch_size=4, in_channels=3, num_classes=3),
    ],
)
def test_output_shapes(kw):
    model = _tiny(**kw)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    B, C, S = 3, kw["in_channels"], kw["input_size"]
    labels = torch.randint(0, kw["num_classes"], (B,)) if kw.get("num_classes") else None
    out = model(torch.randn(B, C, S, S), labels)
    states = model.trajectory(torch.randn(B, C, S, S), labels)
    assert out.shape == (B, C, S, S) and len(states) == 6 and all(s.shape == (B, C, S, S) for s in states)


def test_vit_baseline_shapes():
    model = GET_models["ViT-B/2"](hidden_size=64, num_heads=2, depth=2, input_size=8, num_classes=4)
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([0, 3]))
    assert out.shape == (2, 3, 8, 8) and len(model.trajectory(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))) == 1
    # A ViT draws nothing: a z0 or a generator is refused, never silently ignored.
    with pytest.raises(ValueError, match="z0"):
        model(torch.randn(2, 3, 8, 8), torch.tensor([0, 3]), z0=torch.zeros(2, 16, 64))
    with pytest.raises(ValueError, match="generator"):
        model.trajectory(torch.randn(2, 3, 8, 8), torch.tensor([0, 3]), generator=torch.Generator())
    assert model.input_spec.z0_shape is None and model.input_spec.label_dim == 4


def test_determinism_with_generator():
    model = _tiny(num_classes=3)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    a = model(x, y, generator=torch.Generator().manual_seed(7))
    b = model(x, y, generator=torch.Generator().manual_seed(7))
    c = model(x, y, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_explicit_z0_matches_generator_draw():
    model = _tiny()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    x = torch.randn(2, 3, 8, 8)
    # (B, N, D) drawn on the official (B, D, N) memory layout (see test_seeded_z0_reproduces_the_official_draw)
    z0 = torch.empty(2, 64, 16).transpose(1, 2).normal_(generator=torch.Generator().manual_seed(3))
    assert torch.equal(model(x, z0=z0), model(x, generator=torch.Generator().manual_seed(3)))


def _official_injt_output(model, noise, labels):
    """locuslab/get models/get.py GET.forward up to ``z = torch.randn_like(x)``, in plain torch ops on our weights:
    timm PatchEmbed (conv, flatten(2).transpose(1, 2)) + pos_embed, then the InjT blocks
    x = x + attn(norm1(x), c); x = x + mlp(norm2(x)) with the class embedding added to the fused qkv."""
    w, b = model.x_embedder.proj.weight, model.x_embedder.proj.bias
    x = F.conv2d(noise, w, b, stride=model.patch_size).flatten(2).transpose(1, 2) + model.pos_embed
    B, N, D = x.shape
    H = model.num_heads
    c = model.y_embedder.embedding_table(labels).view(B, 1, 3 * D)
    for blk in model.blocks:
        h = F.layer_norm(x, (D,), blk.norm1.weight, blk.norm1.bias, 1e-6)
        qkv = (F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias) + c).reshape(B, N, 3, H, D // H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + F.linear(a, blk.attn.proj.weight, blk.attn.proj.bias)
        h = F.layer_norm(x, (D,), blk.norm2.weight, blk.norm2.bias, 1e-6)
        h = F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias))
        x = x + F.linear(h, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    return x


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_seeded_z0_reproduces_the_official_draw(device):
    model = GET_models["GET-XXS/2"](input_size=8, num_classes=3, depth=2).to(device)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    x, y = torch.randn(2, 3, 8, 8, device=device), torch.tensor([2, 0], device=device)
    with torch.no_grad():
        x_official = _official_injt_output(model, x, y)
        h, ops, c = model.embed(x), model._ops(x.device), model.y_embedder(y)
        for blk in model.blocks:
            h = blk(h, ops, c)
        torch.testing.assert_close(x_official, h, atol=1e-5, rtol=1e-5)  # the reference computes the same InjT
    assert not x_official.is_contiguous()  # the layout the official draw sees
    torch.manual_seed(11)
    ours = model(x, y)
    torch.manual_seed(11)
    z_official = torch.randn_like(x_official)
    assert torch.equal(ours, model(x, y, z0=z_official))
    if device == "cpu":  # a contiguous draw of the same seed differs: the bug this test guards against
        torch.manual_seed(11)
        assert not torch.allclose(torch.randn(z_official.shape), z_official)


def test_gradients_reach_every_trainable_parameter():
    model = _tiny(num_classes=2).train()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)  # a zero decoder would block every gradient
    states = model.trajectory(torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 1]))
    sum((s**2).mean() for s in states).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert name == "pos_embed" and p.grad is None


def test_trajectory_equals_unrolled_fixed_point_steps():
    # Training states are exactly z_k = f(z_{k-1}), k = 1..6, from z_0 (docs/GET.md).
    model = _tiny()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    x = torch.randn(2, 3, 8, 8)
    z0 = torch.randn(2, 16, 64)
    f, _, ops = model._prepare(x, None, z0, None)
    z, ref = z0, []
    for _ in range(6):
        z = f(z)
        ref.append(model.decode(z, ops))
    for a, b in zip(model.trajectory(x, z0=z0), ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _contractive(model, beta=0.5):
    """EqT weights for which f pulls each token's direction to a fixed unit-variance vector z_hat_star.

    Attention adds nothing (proj = 0); LN2 gives -beta*z_hat + beta*z_hat_star; the MLP is the identity on it
    (GELU(v + 20) - 20 = v to float precision). The update is then beta*(z_hat_star - z_hat): f contracts.
    """
    D = model.hidden_size
    target = torch.randn(D)
    target = (target - target.mean()) / target.std(unbiased=False)
    with torch.no_grad():
        for blk in model.deq_blocks:
            blk.attn.proj.weight.zero_()
            blk.attn.proj.bias.zero_()
            blk.norm2.weight.fill_(-beta)
            blk.norm2.bias.copy_(beta * target)
            H = blk.mlp.fc1.out_features
            blk.mlp.fc1.weight.zero_()
            blk.mlp.fc1.weight[:D].copy_(torch.eye(D))
            blk.mlp.fc1.bias.fill_(-20.0)
            blk.mlp.fc1.bias[:D] = 20.0
            blk.mlp.fc2.weight.zero_()
            blk.mlp.fc2.weight[:, :D].copy_(torch.eye(D))
            blk.mlp.fc2.bias.fill_(-20.0)
        assert H >= D
    return target


def test_eval_residual_shrinks_for_contractive_f():
    model = _tiny().eval()
    _contractive(model)
    _, info = model(torch.randn(3, 3, 8, 8), return_info=True)
    r = info["abs_trace"]  # (B, 6)
    assert r.shape == (3, 6)
    assert (r[:, 1:] < r[:, :-1]).all(), r
    assert (r[:, -1] < 1e-2 * r[:, 0]).all(), r
    assert (info["nstep"] == 6).all()


def test_sync_free_solver_equals_torchdeq_solver():
    model = _tiny().eval()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    torchdeq_model = _tiny(deq=dict(sync_free=False)).eval()
    torchdeq_model.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, 8, 8)
    a, ia = model(x, generator=torch.Generator().manual_seed(1), return_info=True)
    b, ib = torchdeq_model(x, generator=torch.Generator().manual_seed(1), return_info=True)
    assert torch.equal(a, b)
    assert torch.equal(ia["nstep"].float(), ib["nstep"].float())
    torch.testing.assert_close(ia["abs_trace"], ib["abs_trace"][:, 1:])  # torchdeq's trace starts with 1e8


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_sync_free_trajectory_equals_torchdeq_phantom_gradient(tau):
    model = _tiny(deq=dict(tau=tau))
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    torchdeq_model = _tiny(deq=dict(tau=tau, sync_free=False))
    torchdeq_model.load_state_dict(model.state_dict())
    x, target = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    grads = []
    for m in (model, torchdeq_model):
        states, info = m.trajectory(x, generator=torch.Generator().manual_seed(1), return_info=True)
        assert len(states) == 6
        sum((s - target).abs().mean() * 0.8 ** (5 - k) for k, s in enumerate(states)).backward()
        grads.append(([s.detach() for s in states], info["abs_trace"], [p.grad for p in m.parameters()
                                                                         if p.grad is not None]))
    (states_a, trace_a, grad_a), (states_b, trace_b, grad_b) = grads
    for a, b in zip(states_a + [trace_a] + grad_a, states_b + [trace_b] + grad_b):
        assert torch.equal(a, b)


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_other_solvers_reach_the_fixed_point(solver):
    model = _tiny(deq=dict(f_solver=solver, eval_f_max_iter=20)).eval()
    _contractive(model)
    x = torch.randn(2, 3, 8, 8)
    f, z0, _ = model._prepare(x, None, None, torch.Generator().manual_seed(0))
    z_star, _ = model.solver.solve(f, z0)
    assert ((f(z_star) - z_star).flatten(1).norm(dim=1) < 1e-3 * z_star.flatten(1).norm(dim=1)).all()


def test_memory_checkpointing_keeps_values_and_gradients():
    base = _tiny()
    torch.nn.init.normal_(base.final_layer.linear.weight, std=0.1)
    other = _tiny(deq=dict(mem=True))
    other.load_state_dict(base.state_dict())
    x, z0 = torch.randn(2, 3, 8, 8), torch.randn(2, 16, 64)
    for m in (base, other):
        out = m.trajectory(x, z0=z0)
        sum(o.square().mean() for o in out).backward()
    torch.testing.assert_close(other.trajectory(x, z0=z0)[-1], base.trajectory(x, z0=z0)[-1])
    for (name, p), q in zip(base.named_parameters(), other.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_ift_returns_one_step_from_the_solved_state():
    model = _tiny(deq=dict(ift=True, f_max_iter=5, eval_f_max_iter=5))
    _contractive(model)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    x, z0 = torch.randn(2, 3, 8, 8), torch.randn(2, 16, 64)
    (image,) = model.trajectory(x, z0=z0)
    f, _, ops = model._prepare(x, None, z0, None)
    z_star, _ = model.solver.solve(f, z0)  # same 5 iterations and lowest-residual selection
    torch.testing.assert_close(image, model.decode(f(z_star), ops))
    image.square().mean().backward()
    assert model.deq_blocks[0].norm2.bias.grad.abs().sum() > 0  # (the contractive f ignores the injection)
    with pytest.raises(ValueError, match="ift needs f_max_iter"):
        validate_deq_options(ift=True)


def test_save_load_round_trip_exact(tmp_path):
    model = _tiny(num_classes=3)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    ema = {k: v + 0.01 for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path, state_dict=ema, filename="ema.safetensors")
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([2, 0])
    loaded = GET.from_pretrained(tmp_path, ema=False)
    assert loaded.config == model.config
    assert torch.equal(loaded(x, y, generator=torch.Generator().manual_seed(0)),
                       model(x, y, generator=torch.Generator().manual_seed(0)))  # fmt: skip
    loaded_ema = GET.from_pretrained(tmp_path)  # EMA weights by default
    assert torch.equal(loaded_ema.qkv_inj.weight, ema["qkv_inj.weight"])


def test_official_pth_checkpoint_loads_with_weights_only(tmp_path):
    model = GET_models["GET-XXS/2"](input_size=8, num_classes=10)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ema = {k: v + 0.001 for k, v in sd.items()}
    args = argparse.Namespace(model="GET-XXS/2", cond=True, num_classes=10, input_size=8, lr=1e-4)
    # The official file: args Namespace, model and ema state dicts (DDP 'module.' prefix on one), and opt.
    torch.save({"args": args, "model": {"module." + k: v for k, v in sd.items()}, "ema": ema,
                "opt": {"state": {}, "param_groups": []}}, tmp_path / "final.pth")  # fmt: skip
    loaded = GET.from_pretrained(tmp_path / "final.pth", ema=False)
    assert all(torch.equal(loaded.state_dict()[k], sd[k]) for k in sd)
    loaded_ema = GET.from_pretrained(tmp_path / "final.pth")
    assert all(torch.equal(loaded_ema.state_dict()[k], ema[k]) for k in ema)
    assert loaded.num_classes == 10 and loaded.depth == 1 and loaded.deq_mlp_ratio == 2


def test_official_weight_norm_keys_are_folded(tmp_path):
    model = _tiny()
    sd = model.state_dict()
    w = sd["deq_blocks.0.attn.qkv.weight"]
    g = torch.rand(w.shape[0], 1) + 0.5
    v = torch.randn_like(w)
    del sd["deq_blocks.0.attn.qkv.weight"]
    sd["deq_blocks.0.attn.qkv.weight_g"], sd["deq_blocks.0.attn.qkv.weight_v"] = g, v
    torch.save({"args": argparse.Namespace(input_size=8), "model": sd, "ema": sd}, tmp_path / "wn.pth")
    loaded = GET.from_pretrained(tmp_path / "wn.pth")
    expected = torch._weight_norm(v, g, dim=0)
    torch.testing.assert_close(loaded.deq_blocks[0].attn.qkv.weight, expected)


def test_malicious_pth_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    torch.save({"model": {}, "ema": {}, "evil": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only"):
        GET.from_pretrained(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()


def _official_file(path, model, args=None, edit=None, **save_kwargs):
    """An official-layout trainer file of ``model``'s weights; ``edit`` changes the 'ema' entry."""
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    ema = ema if edit is None else edit(ema)
    torch.save({"args": args, "model": dict(ema) if isinstance(ema, dict) else ema, "ema": ema, "opt": {}}, path,
               **save_kwargs)
    return path


def test_official_heads_come_from_args_model(tmp_path):
    xxs = GET_models["GET-XXS/2"](input_size=8)  # D = 64, 2 heads
    path = _official_file(tmp_path / "a.pth", xxs, argparse.Namespace(model="GET-XXS/2", input_size=8))
    assert GET.from_pretrained(path).num_heads == 2  # was D // 64 = 1
    assert GET.from_pretrained(_official_file(tmp_path / "b.pth", xxs)).num_heads == 1  # no name: D / 64
    with pytest.raises(ValueError, match="args.model='GET-B/2' has hidden_size 768"):
        GET.from_pretrained(_official_file(tmp_path / "c.pth", xxs, argparse.Namespace(model="GET-B/2")))
    with pytest.raises(ValueError, match="args.model='GET-Z/2' is not a registered GET config"):
        GET.from_pretrained(_official_file(tmp_path / "d.pth", xxs, argparse.Namespace(model="GET-Z/2")))
    odd = GET(input_size=8, hidden_size=96, num_heads=2, depth=1, deq_mlp_ratio=2)
    path = _official_file(tmp_path / "e.pth", odd)
    with pytest.raises(ValueError, match="cannot infer num_heads: no args.model and hidden size 96"):
        GET.from_pretrained(path)
    assert GET.from_pretrained(path, num_heads=2).num_heads == 2
    small = GET(input_size=8, hidden_size=48, num_heads=1, depth=1, deq_mlp_ratio=2)
    with pytest.raises(ValueError, match="hidden size 48 is not a multiple of 64"):  # was a ZeroDivisionError
        GET.from_pretrained(_official_file(tmp_path / "f.pth", small))


def _set(key, value):
    def edit(sd):
        sd[key] = value
        return sd
    return edit


def _drop(key):
    def edit(sd):
        del sd[key]
        return sd
    return edit


def _weight_norm(keep):
    def edit(sd):
        w = sd.pop("deq_blocks.0.attn.qkv.weight")
        sd["deq_blocks.0.attn.qkv.weight_" + keep] = torch.ones(w.shape[0], 1) if keep == "g" else w
        return sd
    return edit


def _views_of_one_storage(sd):
    """Every weight a view of one storage as large as the largest: valid views, together 5x the file."""
    shared = torch.zeros(max(v.numel() for v in sd.values()))
    return {k: shared[:v.numel()].view(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("edit,match", [
    (lambda sd: list(sd.values()), r"ckpt\['ema'\] is a list, not a state dict"),
    (_set(3, torch.zeros(1)), r"ckpt\['ema'\] has a key of type int"),
    (_set("pos_embed", "sincos"), r"ckpt\['ema'\]\['pos_embed'\] is a str, not a tensor"),
    (_weight_norm("v"), "weight_v without deq_blocks.0.attn.qkv.weight_g"),
    (_weight_norm("g"), "weight_g without deq_blocks.0.attn.qkv.weight_v"),
    (_drop("pos_embed"), "missing key 'pos_embed'"),
    (_set("pos_embed", torch.zeros(1, 15, 64)), r"pos_embed \(1, 15, 64\) is not \(1, grid², D\)"),
    (_set("pos_embed", torch.zeros(1).expand(1, 16, 64)), "overlap"),  # a 4-byte storage as 1024 elements
    (_set("pos_embed", torch.zeros(1).expand(1, 50_000, 50_000)), "overlap"),  # claims 10 GB
    (_views_of_one_storage, "more than the"),
], ids=["ema-list", "int-key", "str-pos-embed", "weight_v-alone", "weight_g-alone", "missing", "pos-shape",
        "zero-stride", "zero-stride-10GB", "shared-storage"])
def test_malformed_official_files_give_clear_errors(tmp_path, fails_fast, edit, match):
    path = _official_file(tmp_path / "bad.pth", _tiny(), argparse.Namespace(input_size=8), edit=edit)
    with fails_fast(seconds=10, max_mb=200), pytest.raises((ValueError, KeyError), match=match) as info:
        GET.from_pretrained(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("args,match", [
    (argparse.Namespace(input_size=1024), "args.input_size=1024 but pos_embed and the patch size give 8"),
    (argparse.Namespace(input_size=10**9), r"args.input_size must be an integer in \[1, 1024\]"),
    (argparse.Namespace(input_size="8"), "args.input_size must be an integer"),
    ([1, 2], "ckpt\\['args'\\] is a list"),
], ids=["1024", "huge", "str", "list"])
def test_official_args_are_checked_against_the_weights(tmp_path, fails_fast, args, match):
    path = _official_file(tmp_path / "a.pth", _tiny(), args)
    with fails_fast(seconds=10, max_mb=200), pytest.raises(ValueError, match=match):
        GET.from_pretrained(path)


def test_legacy_and_compressed_pth_files_are_refused(tmp_path):
    path = _official_file(tmp_path / "legacy.pth", _tiny(), _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="not a zip-format torch.save file"):
        GET.from_pretrained(path)
    good = _official_file(tmp_path / "good.pth", _tiny())
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(tmp_path / "deflated.pth", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with pytest.raises(ValueError, match="is compressed or reaches past the file's end"):
        GET.from_pretrained(tmp_path / "deflated.pth")


@pytest.mark.parametrize("change,match", [
    (dict(input_size=1024), "input_size=1024 \\(weights: 8\\)"),
    (dict(hidden_size=8192, num_heads=128), "hidden_size=8192 \\(weights: 64\\)"),
    (dict(depth=10**6), r"depth must be an integer in \[0, 256\]"),
    (dict(deq_mlp_ratio=64.0), r"deq_mlp_ratio=64.0 \(weights: width 128 for D=64\)"),
    (dict(num_classes=10**5), "num_classes=100000 \\(weights: 0\\)"),
    (dict(evil=1), r"unknown GET argument\(s\) \['evil'\]"),
    (dict(num_heads=3), "num_heads=3 does not divide the hidden size 64"),
], ids=["input_size", "hidden_size", "depth", "deq_mlp_ratio", "num_classes", "unknown", "num_heads"])
def test_our_config_is_checked_against_the_weights_before_building(tmp_path, fails_fast, change, match):
    _tiny().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with fails_fast(seconds=10, max_mb=200), pytest.raises(ValueError, match=match) as info:
        GET.from_pretrained(tmp_path)
    assert "config.json" in str(info.value)


def test_clear_errors():
    model = _tiny(num_classes=3)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"shape \(B, 3, 8, 8\)"):
        model(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"shape \(B, 3, 8, 8\)"):
        model(torch.randn(2, 3, 10, 10), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="pass class_labels"):
        model(x)
    with pytest.raises(ValueError, match="out of range"):
        model(x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="integer tensor of shape"):
        model(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="unconditional"):
        _tiny()(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="NaN or inf"):
        model(torch.full((2, 3, 8, 8), float("nan")), torch.tensor([0, 1]))
    with pytest.raises(KeyError, match="unknown model config 'GET-Z/2'"):
        create_model("GET-Z/2")
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        _tiny(input_size=9)
    with pytest.raises(ValueError, match="unknown backend"):
        _tiny(backend="cuda")


def test_deq_options_validated():
    with pytest.raises(ValueError, match=r"unknown DEQ option\(s\) \['stop_mode'\]"):
        _tiny(deq=dict(stop_mode="abs"))
    with pytest.raises(ValueError, match="unknown DEQ solver"):
        validate_deq_options(f_solver="newton")
    with pytest.raises(ValueError, match="tau must be in"):
        validate_deq_options(tau=1.5)
    with pytest.raises(ValueError, match="grad must be at least 1"):
        validate_deq_options(grad=0)
    with pytest.raises(ValueError, match="non-negative integer"):
        validate_deq_options(f_max_iter=-1)
    assert validate_deq_options()["grad"] == 6 and validate_deq_options()["eval_f_max_iter"] == 6
    with pytest.raises(ValueError, match="eval_select must be one of"):
        validate_deq_options(eval_select="first")
    with pytest.raises(ValueError, match="eval_select='last' needs f_solver='fixed_point_iter'"):
        validate_deq_options(eval_select="last", f_solver="anderson")


def test_eval_select_last_returns_the_trained_iterate(tmp_path):
    """eval_select='last': forward is trajectory()[-1] bit for bit (the iterate DMD trains), nstep is K for every
    sample; the option survives save_pretrained / from_pretrained; the default still selects per sample."""
    model = _tiny().eval()
    x, z0 = torch.randn(4, 3, 8, 8), torch.randn(4, 16, 64)
    with torch.no_grad():
        last = model.trajectory(x, z0=z0)[-1]
        lowest, info = model(x, z0=z0, return_info=True)
        model.set_deq_options(eval_select="last")
        out, info_last = model(x, z0=z0, return_info=True)
    assert torch.equal(out, last) and info_last["nstep"].tolist() == [6] * 4
    picked_last = info["nstep"] == 6  # the default differs exactly where it picked an earlier iterate
    assert torch.equal(lowest[picked_last], last[picked_last])
    model.save_pretrained(tmp_path / "m")
    loaded = GET.from_pretrained(tmp_path / "m").eval()
    assert loaded.config["deq"]["eval_select"] == "last"
    with torch.no_grad():
        assert torch.equal(loaded(x, z0=z0), last)
    with pytest.raises(ValueError, match="eval_select must be one of"):
        model.set_deq_options(eval_select="best")


def test_non_finite_state_raises():
    model = _tiny()
    with torch.no_grad():
        model.deq_blocks[1].mlp.fc2.bias.fill_(float("inf"))
    with pytest.raises(NonFiniteError):
        model(torch.randn(2, 3, 8, 8))
    with pytest.raises(NonFiniteError):
        model.trajectory(torch.randn(2, 3, 8, 8))


def test_non_finite_noise_gives_nan_images_without_the_checks():
    """check_finite=False (CUDA graphs, the trainers) skips the host-side checks, but a sample whose noise holds NaN or
    inf must still come out NaN, never a finite image decoded from z_0; the other samples are untouched."""
    for model in (_tiny(), GET_models["ViT-B/2"](input_size=8, hidden_size=64, num_heads=2, depth=1)):
        with torch.no_grad():  # a non-zero output layer: a fresh model outputs 0 whatever its input
            model.final_layer.linear.bias.fill_(0.5)
        model.check_finite = False
        noise = torch.randn(3, 3, 8, 8)
        noise[1, 0, 2, 3] = float("nan")
        noise[2, 2, 0, 0] = float("inf")
        z0 = draw_inputs([0, 1, 2], model).z0
        clean = model(noise[:1], z0=None if z0 is None else z0[:1])
        outputs = [model(noise, z0=z0), model.trajectory(noise, z0=z0)[-1]]
        for images in outputs:
            assert images[1:].isnan().all() and torch.isfinite(images[0]).all()
            torch.testing.assert_close(images[0], clean[0])


def test_noise_dtype_and_constructor_sizes_are_checked():
    model = _tiny()
    for dtype in (torch.float64, torch.float16):
        with pytest.raises(ValueError, match=f"noise must be torch.float32 like the model's weights, got {dtype}"):
            model(torch.randn(2, 3, 8, 8, dtype=dtype))
    assert model.double()(torch.randn(2, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64
    for key in ("input_size", "in_channels", "patch_size", "hidden_size", "num_heads"):
        with pytest.raises(ValueError, match=f"GET: {key} must be an integer in \\[1, "):
            _tiny(**{key: 0})
    with pytest.raises(ValueError, match="ViT: in_channels must be an integer"):
        GET_models["ViT-B/2"](in_channels=0)
    with pytest.raises(ValueError, match="hidden_size 66 must be divisible by num_heads 4"):
        _tiny(hidden_size=66, num_heads=4)


def test_unknown_config_and_missing_path_are_named(tmp_path):
    names = re.escape(str(list(GET_models)))
    with pytest.raises(KeyError, match=f"unknown model config 'GET-ZZZ/2'; choose one of {names}"):
        GET_models["GET-ZZZ/2"]
    with pytest.raises(KeyError, match="unknown model config 'GET-ZZZ/2'"):
        create_model("GET-ZZZ/2")
    assert "GET-B/2" in GET_models and GET_models.get("GET-ZZZ/2") is None  # the dict API is unchanged
    _tiny().save_pretrained(tmp_path / "model")
    for missing in (tmp_path / "model" / "nope", tmp_path / "model" / "nope.safetensors", tmp_path / "nope.pth"):
        with pytest.raises(FileNotFoundError, match=f"^{re.escape(str(missing))}: no such model folder or file"):
            GET.from_pretrained(missing)
