"""Triton LayerNorm (+ fused residual add) against a float64 reference (Triton interpreter without a GPU)."""

import pytest
import torch
from kernel_cases import DEVICE, DTYPES, gpu_only

from get_kernels import get_ops, reference, utils
from get_kernels.layer_norm import MAX_DIM, LayerNormFunction, layer_norm
from get_kernels.testing import assert_matches_reference

# Every output buffer a kernel allocates starts as NaN, so an unwritten tile fails (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("poison_kernel_outputs")


def make_inputs(shape, dtype, residual):
    D = shape[-1]
    x = 1.5 + 2 * torch.randn(shape, device=DEVICE, dtype=dtype)  # an offset mean, as the residual stream has
    r = torch.randn(shape, device=DEVICE, dtype=dtype) if residual else None
    w = (1 + 0.3 * torch.randn(D, device=DEVICE)).to(dtype)
    b = (0.3 * torch.randn(D, device=DEVICE)).to(dtype)
    return x, r, w, b


def run_layer_norm(fn, x, r, w, b, cast=None, grads=None):
    """Outputs and input gradients (x, residual, weight, bias) of fn on fresh leaf copies, cast to `cast`.

    grads: one upstream gradient per output; None backpropagates .sum() (stride-0 upstream gradients).
    """
    leaves = [None if t is None else t.detach().to(cast or t.dtype).clone().requires_grad_() for t in (x, r, w, b)]
    out = fn(leaves[0], leaves[2], leaves[3], eps=1e-6, residual=leaves[1])
    outs = out if isinstance(out, tuple) else (out,)
    if grads is None:
        sum(o.sum() for o in outs).backward()
    else:
        torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads)])
    return list(outs), [t.grad for t in leaves if t is not None]


def check_against_float64(x, r, w, b, grads, view=None):
    """view: applied to the x and residual leaves inside the graph, so the op sees strided tensors."""
    results = []
    for fn, cast in ((layer_norm, None), (reference.layer_norm, None), (reference.layer_norm, torch.float64)):
        if view is not None:
            fn = lambda x, w, b, eps, residual, fn=fn: fn(view(x), w, b, eps=eps, residual=view(residual))
        results.append(run_layer_norm(fn, x, r, w, b, cast, grads))
    ours, torch_same, ref64 = results
    for name, a, s, ref in zip(("y", "x + residual"), ours[0], torch_same[0], ref64[0]):
        assert_matches_reference(name, a, s, ref)
    names = ("dx", "dresidual", "dweight", "dbias") if r is not None else ("dx", "dweight", "dbias")
    for name, a, s, ref in zip(names, ours[1], torch_same[1], ref64[1]):
        assert_matches_reference(name, a, s, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", [(3, 41, 384), (5, 100), (2, 3, 1000)], ids=str)
def test_forward_and_gradients_match_float64(shape, residual, dtype):
    x, r, w, b = make_inputs(shape, dtype, residual)
    grads = [torch.randn(shape, device=DEVICE) for _ in range(2 if residual else 1)]
    check_against_float64(x, r, w, b, grads)


def test_strided_input_and_stride0_gradient():
    x, r, w, b = make_inputs((3, 40, 192), torch.float32, residual=True)
    view = lambda t: t[..., 50:146]  # (3, 40, 96), rows 192 apart: read through strides
    assert view(x).reshape(-1, 96).stride() == (192, 1)
    w, b = w[::2].clone(), b[::2].clone()  # (96,) each
    check_against_float64(x, r, w, b, grads=None, view=view)
    w2 = torch.stack([w, w], dim=1)[:, 0]  # the same weight through stride 2
    torch.testing.assert_close(layer_norm(view(x), w2, b), layer_norm(view(x), w, b), rtol=0, atol=0)


def test_mixed_dtypes_promote_like_the_residual_add():
    # Under autocast the block adds a half-precision branch output to the fp32 stream, with fp32 LayerNorm weights.
    x, r, w, b = make_inputs((5, 100), torch.float32, residual=True)
    x = x.half()
    grads = [torch.randn(5, 100, device=DEVICE), torch.randn(5, 100, device=DEVICE)]
    y, s = layer_norm(x, w, b, residual=r)
    assert y.dtype == s.dtype == torch.float32
    check_against_float64(x, r, w, b, grads)
    leaves = [t.clone().requires_grad_() for t in (x, r)]
    sum(o.sum() for o in layer_norm(leaves[0], w, b, residual=leaves[1])).backward()
    assert leaves[0].grad.dtype == torch.float16 and leaves[1].grad.dtype == torch.float32


def test_only_residual_sum_used():
    # y unused: its gradient is None, and the residual sum passes its gradient straight through to x and residual.
    x, r, w, b = make_inputs((4, 64), torch.float32, residual=True)
    x.requires_grad_()
    r.requires_grad_()
    w.requires_grad_()
    _, s = layer_norm(x, w, b, residual=r)
    (3 * s).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))
    assert torch.equal(r.grad, torch.full_like(r, 3.0))
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_entry_points_agree_and_backward_is_deterministic():
    x, r, w, b = make_inputs((6, 33, 128), torch.float16, residual=True)
    grads = [torch.randn(6, 33, 128, device=DEVICE), torch.randn(6, 33, 128, device=DEVICE)]
    first = run_layer_norm(layer_norm, x, r, w, b, grads=grads)
    again = run_layer_norm(layer_norm, x, r, w, b, grads=grads)
    via_function = run_layer_norm(
        lambda x, w, b, eps, residual: LayerNormFunction.apply(x, residual, w, b, eps)[:2], x, r, w, b, grads=grads
    )
    via_ops = run_layer_norm(get_ops("triton").layer_norm, x, r, w, b, grads=grads)
    for other in (again, via_function, via_ops):
        for a, c in zip(first[0] + first[1], other[0] + other[1]):
            assert torch.equal(a, c)


def test_clear_errors(monkeypatch):
    x, r, w, b = make_inputs((4, 64), torch.float32, residual=True)
    with pytest.raises(ValueError, match="weight and bias must have shape"):
        layer_norm(x, w[:32], b)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        layer_norm(x, w, b, residual=r[:2])
    with pytest.raises(ValueError, match="weight and bias are required"):
        layer_norm(x, None, b)
    with pytest.raises(ValueError, match=f"must be in \\[1, {MAX_DIM}\\]"):
        layer_norm(torch.randn(2, MAX_DIM + 1, device=DEVICE), torch.ones(MAX_DIM + 1, device=DEVICE),
                   torch.zeros(MAX_DIM + 1, device=DEVICE))  # fmt: skip
    with pytest.raises(TypeError, match="float64"):
        layer_norm(x.double(), w, b)
    monkeypatch.setattr(utils, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        layer_norm(x.cpu(), w.cpu(), b.cpu())


@gpu_only
def test_torch_compile_matches_eager():
    x, r, w, b = make_inputs((8, 256, 768), torch.bfloat16, residual=True)
    grads = [torch.randn(8, 256, 768, device="cuda"), torch.randn(8, 256, 768, device="cuda")]
    eager = run_layer_norm(layer_norm, x, r, w, b, grads=grads)
    compiled = run_layer_norm(torch.compile(layer_norm, fullgraph=True), x, r, w, b, grads=grads)
    for a, c in zip(eager[0] + eager[1], compiled[0] + compiled[1]):
        torch.testing.assert_close(a, c)  # Inductor may sum the partials in another order
