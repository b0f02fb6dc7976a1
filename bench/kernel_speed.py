"""Triton kernels vs PyTorch on one NVIDIA GPU: attention against every SDPA backend, and whole GET-B/2 steps.

Table 1, attention at GET shapes (d = 64, random bf16 inputs): time of the forward and of forward+backward for our
packed-QKV kernel and for the torch path (`get_kernels.reference.attention`: SDPA plus its layout copies) with each SDPA
backend forced (flash, efficient, cudnn, math); TFLOP/s (forward 4·B·H·N²·d, backward 2.5x that) and GB/s (forward
reads q, k, v and writes o; backward reads q, k, v, o, dO and writes dq, dk, dv), their share of the H100's measured
798 TFLOP/s and 3.0 TB/s (docs/KERNELS.md), and the speedup over the best SDPA backend. Timer: triton.testing.do_bench
(median, L2 flushed before each call).

Table 2, GET-B/2 (32x32x3, unconditional, randomised weights, bf16 autocast by default): a training step (6 unrolled
fixed-point steps, loss, backward, fused AdamW) and a 6-iteration evaluation forward, backend triton vs torch, eager
and under torch.compile; images/s, achieved TFLOP/s (FLOPs counted by torch's FlopCounterMode on the torch backend),
peak memory, and the speedup of triton over torch in the same mode. Timer: CUDA events over --iters calls after
--warmup calls.

Table 0 (--part accuracy, also without a GPU, in the Triton interpreter): the largest error against float64 of every
output and input gradient of the three ops, ours and PyTorch's in the same precision, at the tests' shapes (odd N and
D, every head dim), fp32 and fp16, plus bf16 on a GPU.

All ratios come from one run. Record the device, versions and date it prints with the tables.

    python bench/kernel_speed.py                     # the two GPU tables
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
GOALS = dict(attention_speedup=1.3, train_speedup_eager=1.5, sample_images_per_s=2400, train_images_per_s=650)


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


# ---------------------------------------------------------------------------------------------------------------
# Whole GET-B/2 steps


def make_model(backend: str):
    from get.models import GET_models

    torch.manual_seed(0)
    model = GET_models["GET-B/2"](backend=backend).cuda()
    with torch.no_grad():  # off the zero init: zeros run faster than real data and hide nothing
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    model.check_finite = False  # the finiteness checks read device values on the host every call
    return model


def model_steps(model, batch: int, compiled: bool, autocast: bool):
    """The training-step and evaluation callables of one model."""
    trajectory = torch.compile(model.trajectory) if compiled else model.trajectory
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    noise = torch.randn(batch, 3, 32, 32, device="cuda")  # (B, C, H, W)
    target = torch.randn_like(noise)

    def precision():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)

    def train_step():
        model.train()
        with precision():
            states = trajectory(noise)  # 6 x (B, C, H, W)
            loss = sum((s.float() - target).square().mean() for s in states) / len(states)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def eval_step():
        model.eval()
        with torch.no_grad(), precision():
            forward(noise)

    return train_step, eval_step


def time_calls(fn, warmup: int, iters: int) -> tuple[float, float]:
    """(ms per call, peak GiB allocated during the timed calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters, torch.cuda.max_memory_allocated() / 2**30


def flops_per_image(autocast: bool) -> tuple[float, float]:
    """(training-step FLOPs, evaluation FLOPs) per image, counted on the torch backend with a batch of 4."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = 4
    train_step, eval_step = model_steps(make_model("torch"), batch, compiled=False, autocast=autocast)
    counts = []
    for step in (train_step, eval_step):
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        counts.append(counter.get_total_flops() / batch)
    return counts[0], counts[1]


def bench_model(args) -> None:
    autocast = args.precision == "bf16"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # the official fp32 recipe
    train_flops, eval_flops = flops_per_image(autocast)
    print(f"\nGET-B/2 FLOPs per image: training step {train_flops / 1e9:.0f} G, evaluation {eval_flops / 1e9:.0f} G")
    results = {}
    for compiled in (False, True):
        for backend in ("torch", "triton"):
            train_step, eval_step = model_steps(make_model(backend), args.batch, compiled, autocast)
            for workload, step, flops in (("train", train_step, train_flops), ("eval", eval_step, eval_flops)):
                ms, peak = time_calls(step, args.warmup, args.iters)
                results[workload, compiled, backend] = (ms, peak, flops)
            torch.cuda.empty_cache()
    rows = []
    for (workload, compiled, backend), (ms, peak, flops) in results.items():
        images = args.batch / ms * 1e3
        tflops = images * flops * 1e-12
        base = results[workload, compiled, "torch"][0]
        rows.append([workload, "compile" if compiled else "eager", backend, f"{ms:.1f}", f"{images:.0f}",
                     f"{tflops:.0f}", f"{100 * tflops / PEAK_TFLOPS:.0f}%", f"{peak:.1f}",
                     f"{base / ms:.2f}x"])  # fmt: skip
    print(f"\nGET-B/2, batch {args.batch}, {args.precision}; speedup = torch time / this time, same mode\n")
    header = ["workload", "mode", "backend", "ms/step", "images/s", "TFLOP/s", "% 798", "peak GiB", "vs torch"]
    print(markdown_table(header, rows))
    best = {w: max(args.batch / results[w, c, "triton"][0] * 1e3 for c in (False, True)) for w in ("train", "eval")}
    speedup = results["train", False, "torch"][0] / results["train", False, "triton"][0]
    print(f"\ngoals: training step eager speedup {speedup:.2f}x (goal >= {GOALS['train_speedup_eager']}x); "
          f"sampling {best['eval']:.0f} images/s (goal >= {GOALS['sample_images_per_s']}); "
          f"training {best['train']:.0f} images/s (goal >= {GOALS['train_images_per_s']})")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["accuracy", "attention", "model", "all"], default="all",
                   help="'all' = attention and model; accuracy also runs without a GPU (interpreter)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="three attention shapes instead of the full grid")
    p.add_argument("--batch", type=int, default=128, help="GET-B/2 batch (training and evaluation)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="bf16 autocast, or fp32 with TF32")
    p.add_argument("--warmup", type=int, default=3, help="untimed GET-B/2 calls (compilation included)")
    p.add_argument("--iters", type=int, default=10, help="timed GET-B/2 calls")
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
    if args.part in ("attention", "all"):
        bench_attention(args)
    if args.part in ("model", "all"):
        bench_model(args)


if __name__ == "__main__":
    main()
