"""Triton bias + exact GELU against a float64 reference (Triton interpreter without a GPU)."""

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import DEVICE, DTYPES, gpu_only

from get_kernels import get_ops, reference, utils
from get_kernels.gelu import BiasGeluFunction, bias_gelu
from get_kernels.testing import assert_matches_reference

# Every output buffer a kernel allocates starts as NaN, so an unwritten tile fails (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("poison_kernel_outputs")


def run_bias_gelu(fn, x, bias, dy, cast=None):
    """Output, dx and dbias of fn on fresh leaf copies cast to `cast`; dy None backpropagates .sum()."""
    x, bias = (t.detach().to(cast or t.dtype).clone().requires_grad_() for t in (x, bias))
    y = fn(x, bias)
    if dy is None:
        y.sum().backward()
    else:
        y.backward(dy.to(y.dtype))
    return y, x.grad, bias.grad


def check_against_float64(x, bias, dy, view=None):
    """view: applied to the x leaf inside the graph, so the op sees a strided tensor (clone() would densify it)."""
    results = []
    for fn, cast in ((bias_gelu, None), (reference.bias_gelu, None), (reference.bias_gelu, torch.float64)):
        op = fn if view is None else (lambda x, bias, fn=fn: fn(view(x), bias))
        results.append(run_bias_gelu(op, x, bias, dy, cast))
    for name, a, s, ref in zip(("y", "dx", "dbias"), *results):
        assert_matches_reference(name, a, s, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 41, 384), (5, 100), (2, 3, 1000)], ids=str)
def test_forward_and_gradients_match_float64(shape, dtype):
    x = 2 * torch.randn(shape, device=DEVICE, dtype=dtype)
    bias = torch.randn(shape[-1], device=DEVICE, dtype=dtype)
    check_against_float64(x, bias, torch.randn(shape, device=DEVICE))


def test_strided_input_and_stride0_gradient():
    x = torch.randn(40, 2, 500, device=DEVICE)
    view = lambda x: x[..., 100:400]  # (40, 2, 300), rows 500 apart: read through strides
    assert view(x).reshape(-1, 300).stride() == (500, 1)
    bias = torch.randn(300, device=DEVICE)
    check_against_float64(x, bias, dy=None, view=view)
    strided_bias = torch.stack([bias, bias], dim=1)[:, 0]  # the same bias through stride 2
    torch.testing.assert_close(bias_gelu(view(x), strided_bias), bias_gelu(view(x), bias), rtol=0, atol=0)


def test_is_the_exact_erf_gelu():
    u = torch.linspace(-6, 6, 97, device=DEVICE, dtype=torch.float64)
    y = bias_gelu(u.float()[None], torch.zeros(97, device=DEVICE))[0]
    exact = 0.5 * u * (1 + torch.erf(u / 2**0.5))
    torch.testing.assert_close(y.double(), exact, rtol=1e-6, atol=1e-6)
    assert (exact - F.gelu(u, approximate="tanh")).abs().max() > 1e-4  # the tanh form would fail the line above


def test_entry_points_agree_and_backward_is_deterministic():
    x = torch.randn(4, 37, 200, device=DEVICE, dtype=torch.float16)
    bias, dy = torch.randn(200, device=DEVICE, dtype=torch.float16), torch.randn(4, 37, 200, device=DEVICE)
    first = run_bias_gelu(bias_gelu, x, bias, dy)
    for fn in (bias_gelu, BiasGeluFunction.apply, get_ops("triton").bias_gelu):
        for a, c in zip(first, run_bias_gelu(fn, x, bias, dy)):
            assert torch.equal(a, c)


def test_clear_errors(monkeypatch):
    x = torch.randn(4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="bias must have shape"):
        bias_gelu(x, torch.zeros(63, device=DEVICE))
    with pytest.raises(TypeError, match="int64"):
        bias_gelu(x.long(), torch.zeros(64, device=DEVICE))
    monkeypatch.setattr(utils, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        bias_gelu(x.cpu(), torch.zeros(64))


@gpu_only
def test_torch_compile_matches_eager():
    x = torch.randn(8, 256, 3072, device="cuda", dtype=torch.bfloat16)
    bias, dy = torch.randn(3072, device="cuda", dtype=torch.bfloat16), torch.randn_like(x)
    eager = run_bias_gelu(bias_gelu, x, bias, dy)
    compiled = run_bias_gelu(torch.compile(bias_gelu, fullgraph=True), x, bias, dy)
    for a, c in zip(eager, compiled):
        torch.testing.assert_close(a, c)  # Inductor may sum the partials in another order
