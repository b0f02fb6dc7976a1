"""Triton packed-QKV attention against a float64 reference (runs in the Triton interpreter without a GPU)."""

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_cases import DEVICE, DTYPES, gpu_only

from get_kernels import get_ops, reference, utils
from get_kernels.attention import HEAD_DIMS, AttentionFunction, attention, attention_bwd, attention_fwd
from get_kernels.testing import assert_matches_reference

# Every output buffer a kernel allocates starts as NaN, so an unwritten tile fails (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("poison_kernel_outputs")


def run_attention(fn, qkv, do):
    """Output and dqkv of fn on a fresh leaf copy of qkv, with upstream gradient do (or .sum() when None)."""
    qkv = qkv.detach().clone().requires_grad_()
    o = fn(qkv)
    if do is None:
        o.sum().backward()  # the upstream gradient arrives expanded, with stride 0
    else:
        o.backward(do.to(o.dtype))
    return o, qkv.grad


def check_against_float64(qkv, do=None, atol=1e-6):
    """Forward and dq, dk, dv of the Triton op vs float64, judged against torch in qkv's precision."""
    ours = run_attention(attention, qkv, do)
    torch_same = run_attention(reference.attention, qkv, do)
    ref64 = run_attention(reference.attention, qkv.double(), None if do is None else do.double())
    assert_matches_reference("o", ours[0], torch_same[0], ref64[0], atol=atol)
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_matches_reference(name, ours[1][:, :, i], torch_same[1][:, :, i], ref64[1][:, :, i], atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("B, N, H", [(2, 100, 2), (1, 257, 2)])
def test_forward_and_gradients_match_float64(B, N, H, d, dtype):
    qkv = torch.randn(B, N, 3, H, d, device=DEVICE, dtype=dtype)  # (B, N, 3, H, d), as the qkv Linear gives it
    check_against_float64(qkv, torch.randn(B, N, H * d, device=DEVICE))


def test_strided_qkv_and_stride0_gradient():
    # q, k, v laid out (B, 3, H, N, d) and viewed as (B, N, 3, H, d): no stride of the view is contiguous-like.
    qkv = torch.randn(2, 3, 3, 100, 32, device=DEVICE).permute(0, 3, 1, 2, 4)
    assert not qkv.is_contiguous()
    check_against_float64(qkv, do=None)


# Rows of padded keys overflow inside the dK/dV tile too; they are never stored, but numpy (the interpreter) warns.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_very_negative_scores_with_padded_tiles():
    # Every score is about -96, so exp(-lse) overflows fp32: padded keys (k = 0) must be masked, not multiplied by 0.
    # Forming a score s ~ -96 in fp32 already costs a relative error of about |s|·2^-23 in P = exp(s - lse); the
    # floor allows twice that (the GPU's SDPA happened to land 3.6x below it on dK, the CPU's at our level).
    B, N, H, d = 1, 100, 1, 128
    q = torch.full((B, N, H, d), -8.5, device=DEVICE)
    k = 1 + 0.1 * torch.randn(B, N, H, d, device=DEVICE)
    v = torch.randn(B, N, H, d, device=DEVICE)
    check_against_float64(torch.stack([q, k, v], dim=2), torch.randn(B, N, H * d, device=DEVICE), atol=2 * 96 * 2**-23)


def test_log_sum_exp_and_scale():
    B, N, H, d, scale = 1, 70, 2, 64, 0.3
    qkv = torch.randn(B, N, 3, H, d, device=DEVICE)
    o, lse = attention_fwd(qkv, scale)
    q, k, _ = qkv.double().permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, d)
    lse64 = torch.logsumexp(scale * q @ k.transpose(-1, -2), dim=-1)  # (B, H, N)
    torch.testing.assert_close(lse.double(), lse64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(o.double(), reference.attention(qkv.double(), scale), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention(qkv, scale), o, rtol=0, atol=0)


def test_entry_points_agree_and_are_deterministic():
    qkv = torch.randn(1, 50, 3, 2, 32, device=DEVICE, dtype=torch.float16)
    do = torch.randn(1, 50, 64, device=DEVICE, dtype=torch.float16)
    o1, g1 = run_attention(attention, qkv, do)
    o2, g2 = run_attention(lambda t: AttentionFunction.apply(t, 1 / math.sqrt(32))[0], qkv, do)
    o3, g3 = run_attention(get_ops("triton").attention, qkv, do)
    for a, b in ((o1, o2), (o1, o3), (g1, g2), (g1, g3)):
        assert torch.equal(a, b)


def test_autocast_runs_in_the_autocast_dtype_like_sdpa():
    qkv = torch.randn(1, 40, 3, 2, 32, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.float16):
        o, o_ref = attention(qkv), reference.attention(qkv)
    assert o.dtype == o_ref.dtype == torch.float16
    assert torch.equal(o, attention(qkv.half()))


def test_empty_sequence():
    qkv = torch.randn(2, 0, 3, 2, 32, device=DEVICE, requires_grad=True)
    o = attention(qkv)
    assert o.shape == (2, 0, 64)
    o.sum().backward()
    assert qkv.grad.shape == qkv.shape


def test_poisoned_buffers_are_nan():
    # The autouse fixture is on: a buffer no kernel writes stays NaN, so an unwritten tile fails the comparisons.
    assert utils.empty((4, 3), torch.float32, torch.device(DEVICE)).isnan().all()


def test_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="head dim d=48"):
        attention(torch.randn(1, 8, 3, 2, 48, device=DEVICE))
    with pytest.raises(ValueError, match=r"shape \(B, N, 3, H, d\)"):
        attention(torch.randn(1, 8, 2, 2, 32, device=DEVICE))
    with pytest.raises(TypeError, match="float64"):
        attention(torch.randn(1, 8, 3, 2, 32, device=DEVICE, dtype=torch.float64))
    with pytest.raises(ValueError, match="positive finite"):
        attention(torch.randn(1, 8, 3, 2, 32, device=DEVICE), scale=-1.0)
    qkv = torch.randn(1, 8, 3, 2, 32, device=DEVICE)
    o, lse = attention_fwd(qkv, 0.1)
    with pytest.raises(ValueError, match="do"):
        attention_bwd(o[:, :4], qkv, o, lse, 0.1)
    monkeypatch.setattr(utils, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        attention(torch.randn(1, 8, 3, 2, 32))


@pytest.mark.skipif(not utils.INTERPRET, reason="only the interpreter refuses bfloat16")
def test_interpreter_refuses_bfloat16():
    with pytest.raises(TypeError, match="interpreter"):
        attention(torch.randn(1, 8, 3, 2, 32, dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------------------------------
# GPU only: torch.compile, CUDA graphs, the op registration.


@gpu_only
def test_torch_compile_matches_eager():
    qkv = torch.randn(4, 256, 3, 4, 64, device="cuda", dtype=torch.bfloat16)
    do = torch.randn(4, 256, 256, device="cuda", dtype=torch.bfloat16)
    eager = run_attention(attention, qkv, do)
    compiled = run_attention(torch.compile(attention, fullgraph=True), qkv, do)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@gpu_only
def test_cuda_graph_replay_matches_eager():
    qkv = torch.randn(2, 256, 3, 4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    do = torch.randn(2, 256, 256, device="cuda", dtype=torch.float16)

    def step():
        qkv.grad = None
        o = attention(qkv)
        o.backward(do)
        return o

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as CUDA-graph capture requires
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_graph = step()
    with torch.no_grad():
        qkv.copy_(torch.randn_like(qkv))
    graph.replay()
    o_eager, g_eager = run_attention(attention, qkv, do)
    torch.testing.assert_close(o_graph, o_eager, rtol=0, atol=0)
    torch.testing.assert_close(qkv.grad, g_eager, rtol=0, atol=0)


@gpu_only
@pytest.mark.skipif(not hasattr(torch.ops.get_kernels, "attention_fwd"), reason="torch without triton_op")
def test_opcheck():
    qkv = torch.randn(2, 64, 3, 2, 64, device="cuda", dtype=torch.float16)
    o, lse = attention_fwd(qkv, 0.125)
    torch.library.opcheck(torch.ops.get_kernels.attention_fwd.default, (qkv, 0.125))
    torch.library.opcheck(torch.ops.get_kernels.attention_bwd.default, (torch.randn_like(o), qkv, o, lse, 0.125))


def test_benchmark_counts_match_the_spec_table():
    # GET-S/2 at B = 128 (H 8, N 256, d 64, bf16): 17.2 GFLOP and 134 MB forward, 42.9 and 268 backward.
    script = Path(__file__).parents[1] / "bench" / "kernel_speed.py"
    spec = importlib.util.spec_from_file_location("kernel_speed", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.attention_flops(128, 8, 256, 64) == pytest.approx(17.18e9, rel=1e-3)
    assert bench.attention_bytes(128, 8, 256, 64, 2) == pytest.approx(134.2e6, rel=1e-3)
    assert bench.attention_flops(128, 8, 256, 64, backward=True) - bench.attention_flops(128, 8, 256, 64) == (
        pytest.approx(42.95e9, rel=1e-3)
    )
    fwd_bwd_bytes = bench.attention_bytes(128, 8, 256, 64, 2, backward=True)
    assert fwd_bwd_bytes - bench.attention_bytes(128, 8, 256, 64, 2) == pytest.approx(268.4e6, rel=1e-3)
    if not torch.cuda.is_available():
        result = subprocess.run([sys.executable, spec.origin], capture_output=True, text=True)
        assert result.returncode != 0 and "needs an NVIDIA GPU" in result.stderr
