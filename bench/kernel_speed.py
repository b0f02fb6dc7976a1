"""Triton kernels vs PyTorch: attention against every SDPA backend over a grid of shapes, and the accuracy table.

Whole GET-B/2 training and sampling steps against the official path are timed by bench/gpu_check.py.

Table 1, attention at GET shapes (d = 64, random bf16 inputs): time of the forward and of forward+backward for our
packed-QKV kernel and for the torch path (`get_kernels.reference.attention`: SDPA plus its layout copies) with each SDPA
backend forced (flash, efficient, cudnn, math); TFLOP/s (forward 4·B·H·N²·d, backward 2.5x that) and GB/s (forward
reads q, k, v and writes o; backward reads q, k, v, o, dO and writes dq, dk, dv), their share of the H100's measured
798 TFLOP/s and 3.0 TB/s (docs/KERNELS.md), and the speedup over the best SDPA backend. Timer: triton.testing.do_bench
(median, L2 flushed before each call).

Table 0 (--part accuracy, also without a GPU, in the Triton interpreter): the largest error against float64 of every
output and input gradient of the three ops, ours and PyTorch's in the same precision, at the tests' shapes (odd N and
D, every head dim), fp32 and fp16, plus bf16 on a GPU.

All ratios come from one run. Record the device, versions and date it prints with the tables.

    python bench/kernel_speed.py                     # the attention table (GPU)
    python bench/kernel_speed.py --part attention --quick
    python bench/kernel_speed.py --part accuracy     # CPU: runs the kernels in the Triton interpreter (about a minute)
"""

import argparse
import datetime
import functools
import os
import sys

import torch

PEAK_TFLOPS = 798.0  # bf16 matmul 8192^3, measured on the project's H100 (docs/KERNELS.md)
PEAK_GBPS = 3000.0  # device-to-device copy, read + write, same machine
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
GOALS = dict(attention_speedup=1.3)


# ---------------------------------------------------------------------------------------------------------------
# Counting (no GPU needed)


def attention_flops(B: int, H: int, N: int, d: int, backward: bool = False) -> float:
    """FLOPs of one attention call: 4·B·H·N²·d forward; the backward counted as 2.5x the forward (FA convention)."""
    fwd = 4.0 * B * H * N * N * d
    return fwd * (3.5 if backward else 1.0)


def attention_bytes(B: int, H: int, N: int, d: int, element_size: int, backward: bool = False) -> float:
    """Minimal HBM traffic: forward 4·B·H·N·d elements (q, k, v, o); backward adds 8 (q, k, v, o, dO, dq, dk, dv)."""
    elements = 4 * B * H * N * d + (8 * B * H * N * d if backward else 0)
    return float(elements * element_size)


def attention_shapes(quick: bool) -> list[tuple[int, int, int]]:
    """(B, H, N) grid at d = 64: GET's N = 256 with batches 32-256 and 4-12 heads, and N = 1024 for the anchors."""
    if quick:
        return [(128, 8, 256), (128, 12, 256), (32, 12, 1024)]
    shapes = [(B, H, 256) for B in (32, 128, 256) for H in (4, 6, 8, 12)]
    return shapes + [(B, H, 1024) for B in (32, 128) for H in (4, 12)]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def environment() -> str:
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    return (f"device: {device}; torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}; "
            f"{datetime.datetime.now().isoformat(timespec='minutes')}")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Accuracy


def accuracy_cases(device: str):
    """(op name, shape label, triton fn, torch fn, input tensors, output names, gradient names) at the tests' shapes."""
    from get_kernels import get_ops, reference

    ops = get_ops("triton")
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    gen = torch.Generator(device).manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=gen, device=device).to(dtype)

    for dtype in dtypes:
        for B, N, H in ((2, 100, 2), (1, 257, 2)):
            for d in (32, 64, 128):
                yield ("attention", dtype, f"{B}x{N}x3x{H}x{d}", ops.attention, reference.attention,
                       [randn(B, N, 3, H, d, dtype=dtype)], ["o"], ["dqkv"])  # fmt: skip
        for shape in ((3, 41, 384), (5, 100), (2, 3, 1000)):
            D, label = shape[-1], "x".join(map(str, shape))
            x, r, w, b = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype), 1 + 0.3 * randn(D), 0.3 * randn(D)
            w, b = w.to(dtype), b.to(dtype)
            yield ("layer_norm", dtype, label, ops.layer_norm, reference.layer_norm, [x, w, b],
                   ["y"], ["dx", "dweight", "dbias"])  # fmt: skip
            yield ("layer_norm+residual", dtype, label,
                   lambda x, r, w, b, ln=ops.layer_norm: ln(x, w, b, residual=r),
                   lambda x, r, w, b: reference.layer_norm(x, w, b, residual=r),
                   [x, r, w, b], ["y", "x+residual"], ["dx", "dresidual", "dweight", "dbias"])  # fmt: skip
            yield ("bias_gelu", dtype, label, ops.bias_gelu, reference.bias_gelu, [2 * x, randn(D, dtype=dtype)],
                   ["y"], ["dx", "dbias"])  # fmt: skip


def bench_accuracy(device: str) -> None:
    from get_kernels.testing import max_error, outputs_and_grads
    from get_kernels.utils import poison_outputs

    worst = {}  # (op, dtype, tensor) -> [ours, torch's, worst ratio]
    with poison_outputs():  # an element a kernel never writes stays NaN and shows up as an infinite error
        for op, dtype, _, fn, ref_fn, inputs, out_names, grad_names in accuracy_cases(device):
            outs = ref_fn(*inputs)
            upstream = [torch.randn_like(o, dtype=torch.float64) for o in (outs if isinstance(outs, tuple) else [outs])]
            ours = outputs_and_grads(fn, inputs, upstream)
            theirs = outputs_and_grads(ref_fn, inputs, upstream)
            ref64 = outputs_and_grads(ref_fn, inputs, upstream, dtype=torch.float64)
            for name, a, t, r in zip(out_names + grad_names, ours, theirs, ref64):
                e_ours, e_torch = max_error(a, r), max_error(t, r)
                entry = worst.setdefault((op, str(dtype).removeprefix("torch."), name), [0.0, 0.0, 0.0])
                entry[:] = [max(entry[0], e_ours), max(entry[1], e_torch), max(entry[2], e_ours / max(e_torch, 1e-30))]
    where = "Triton interpreter (CPU)" if device == "cpu" else "GPU"
    print(f"\nAccuracy against float64, worst case over the shapes; {where}; ratio = ours / PyTorch's, per case\n")
    rows = [[op, dt, name, f"{a:.2e}", f"{b:.2e}", f"{c:.2f}"] for (op, dt, name), (a, b, c) in worst.items()]
    print(markdown_table(["op", "dtype", "tensor", "max error, Triton", "max error, PyTorch", "worst ratio"], rows))


# ---------------------------------------------------------------------------------------------------------------
# Attention


def sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]  # fmt: skip


def sdpa_attention(qkv: torch.Tensor, backend) -> torch.Tensor:
    """The torch path (`get_kernels.reference.attention`) with one SDPA backend forced."""
    from torch.nn.attention import sdpa_kernel

    from get_kernels import reference

    with sdpa_kernel(backend):
        return reference.attention(qkv)


def attention_impls() -> dict:
    from get_kernels.attention import attention

    impls = {"triton": attention}
    for name in SDPA_BACKENDS:
        impls[f"sdpa-{name}"] = functools.partial(sdpa_attention, backend=sdpa_backend(name))
    return impls


def attention_call(fn, qkv: torch.Tensor, do: torch.Tensor, backward: bool) -> None:
    if backward:
        fn(qkv).backward(do)
    else:
        with torch.no_grad():
            fn(qkv)


def bench_attention(args) -> None:
    from triton.testing import do_bench

    impls = attention_impls()
    d, dtype = 64, torch.bfloat16
    rows, speedups = [], {}
    for B, H, N in attention_shapes(args.quick):
        qkv = torch.randn(B, N, 3, H, d, device="cuda", dtype=dtype, requires_grad=True)  # (B, N, 3, H, d)
        do = torch.randn(B, N, H * d, device="cuda", dtype=dtype)  # (B, N, H*d)
        with torch.no_grad():
            o_ref = impls["sdpa-math"](qkv.float()).to(dtype)
            err = (impls["triton"](qkv) - o_ref).abs().max().item()
        for backward in (False, True):
            times = {}
            for name, fn in impls.items():
                call = functools.partial(attention_call, fn, qkv, do, backward)
                try:
                    times[name] = do_bench(call, warmup=25, rep=100, grad_to_none=[qkv], return_mode="median")
                except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # backend unavailable for this shape/GPU
                    times[name] = None
                    print(f"  {name} B{B} H{H} N{N} {'fwd+bwd' if backward else 'fwd'}: n/a ({str(e)[:80]})")
                    torch.cuda.empty_cache()
            sdpa = [t for name, t in times.items() if name != "triton" and t is not None]
            best = min(sdpa) if sdpa else None
            flops = attention_flops(B, H, N, d, backward)
            nbytes = attention_bytes(B, H, N, d, qkv.element_size(), backward)
            if best and times["triton"]:
                speedups[B, H, N, backward] = best / times["triton"]
            for name, ms in times.items():
                if ms is None:
                    rows.append([f"{B}x{H}x{N}", "fwd+bwd" if backward else "fwd", name] + ["n/a"] * 5 + ["-"])
                    continue
                tflops, gbps = flops / ms * 1e-9, nbytes / ms * 1e-6
                rows.append([
                    f"{B}x{H}x{N}", "fwd+bwd" if backward else "fwd", name, f"{ms * 1e3:.1f}",
                    f"{tflops:.0f}", f"{100 * tflops / PEAK_TFLOPS:.0f}%",
                    f"{gbps:.0f}", f"{100 * gbps / PEAK_GBPS:.0f}%", f"{best / ms:.2f}x" if best else "-",
                ])  # fmt: skip
        print(f"  B{B} H{H} N{N}: max |triton - sdpa-math (fp32)| = {err:.2e}")
        del qkv, do
        torch.cuda.empty_cache()
    print("\nAttention, bf16, d = 64 (B x H x N); speedup = best SDPA time / this time\n")
    header = ["B x H x N", "pass", "impl", "µs", "TFLOP/s", "% 798", "GB/s", "% 3.0 TB/s", "vs best SDPA"]
    print(markdown_table(header, rows))
    get_b = speedups.get((128, 12, 256, True))
    if get_b is not None:
        print(
            f"\ngoal: fwd+bwd at GET-B shapes (B128 H12 N256) {get_b:.2f}x the best SDPA backend "
            f"(goal >= {GOALS['attention_speedup']}x)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["accuracy", "attention"], default="attention",
                   help="accuracy also runs without a GPU (interpreter)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="three attention shapes instead of the full grid")
    args = p.parse_args()
    if args.part == "accuracy":
        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined, i.e. at their first import
        print(environment())
        bench_accuracy("cuda" if torch.cuda.is_available() else "cpu")
        return
    if not torch.cuda.is_available():
        sys.exit("bench/kernel_speed.py needs an NVIDIA GPU and none is visible (torch.cuda.is_available() is False); "
                 "without one, tests/test_kernels_*.py check the kernels in the Triton interpreter")  # fmt: skip
    print(environment())
    bench_attention(args)


if __name__ == "__main__":
    main()
