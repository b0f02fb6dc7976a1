"""Pair-generation throughput of data_gen/generate.py, measured by running the command itself.

CPU: pairs/s with --nproc 1 and --nproc 2 on the analytic teacher, and their ratio (goal on a 2-core CPU: >= 1.7x).
GPU: pairs/s of the EDM CIFAR-10 DDPM++ network (random weights unless --teacher names real ones) in fp32, TF32 and
bf16 autocast, with the largest difference of each precision's pairs from the fp32 pairs (same seeds).

The rate is the one generate.py prints: pairs of this run over the time from the first batch to the last shard written
(process start, teacher loading and checks excluded). Timings are only comparable within one run on a quiet machine.

    python bench/datagen.py --part cpu
    python bench/datagen.py --part gpu [--teacher edm-cifar10-32x32-uncond-vp]
"""

import argparse
import datetime
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from get.data import PairDataset
from get.edm import EDMPrecond
from get.teachers import save_teacher

ROOT = Path(__file__).resolve().parents[1]
GEN = ROOT / "data_gen" / "generate.py"


def run_generate(outdir: Path, *args: str) -> float:
    """Runs generate.py into a fresh folder and returns the pairs/s it reports."""
    cmd = [sys.executable, str(GEN), "--outdir", str(outdir), "--grid", "0", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    match = re.search(r"= ([0-9.]+) pairs/s", proc.stdout)
    if match is None:
        raise RuntimeError(f"no rate in the output of {' '.join(cmd)}:\n{proc.stdout}")
    return float(match.group(1))


def random_cifar10_network(**overrides) -> EDMPrecond:
    """The EDM CIFAR-10 DDPM++ network (docs/EDM.md, uncond VP config) with random weights; keywords override the
    architecture.

    Every parameter is redrawn (the official init zeroes some output layers, which would hide precision errors)."""
    kwargs = dict(img_resolution=32, img_channels=3, label_dim=0, model_type="SongUNet", augment_dim=9,
                  model_channels=128, channel_mult=[2, 2, 2], dropout=0.13, embedding_type="positional",
                  channel_mult_noise=1, encoder_type="standard", decoder_type="standard", resample_filter=[1, 1],
                  name="edm-cifar10-32x32-uncond-vp-random")
    net = EDMPrecond(**{**kwargs, **overrides})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5 * (1.0 if p.ndim > 1 else 0.1))
    return net


def cifar10_random_teacher(directory: Path) -> str:
    """`random_cifar10_network()` saved as a converted teacher; returns its folder."""
    save_teacher(random_cifar10_network(), directory)
    return str(directory)


def cpu_part(args, tmp: Path) -> None:
    common = ["--teacher", args.cpu_teacher, "--seeds", args.cpu_seeds, "--shard-size", str(args.cpu_shard_size),
              "--batch", str(args.cpu_batch), "--device", "cpu"]
    rates = {n: run_generate(tmp / f"cpu{n}", *common, "--nproc", str(n)) for n in (1, 2)}
    print(f"\nCPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), teacher "
          f"{args.cpu_teacher}, seeds {args.cpu_seeds}, batch {args.cpu_batch}, 18 steps")
    print("| --nproc | pairs/s | ratio |\n|---|---|---|")
    for n, rate in rates.items():
        print(f"| {n} | {rate:.1f} | {rate / rates[1]:.2f}x |")


def gpu_part(args, tmp: Path) -> None:
    if not torch.cuda.is_available():
        print("\nGPU part skipped: CUDA is not available")
        return
    teacher = args.teacher or cifar10_random_teacher(tmp / "teacher")
    common = ["--teacher", teacher, "--seeds", args.gpu_seeds, "--batch", str(args.gpu_batch), "--device", "cuda",
              "--shard-size", "100000"]
    rates, images = {}, {}
    for precision in args.precisions:
        out = tmp / f"gpu-{precision}"
        rates[precision] = run_generate(out, *common, "--precision", precision)
        ds = PairDataset(out)
        images[precision] = ds.get_batch(range(len(ds)))["image"].double()  # (N, C, R, R)
    ref = images[args.precisions[0]]
    print(f"\nGPU {torch.cuda.get_device_name()}, teacher {Path(teacher).name}, seeds {args.gpu_seeds}, "
          f"batch {args.gpu_batch}, 18 steps (35 network calls per pair); image RMS {ref.pow(2).mean().sqrt():.3f}")
    rms = ref.pow(2).mean().sqrt()
    print(f"| precision | pairs/s | max abs diff vs {args.precisions[0]} | RMS diff | max abs diff / image RMS |\n"
          f"|---|---|---|---|---|")
    for precision in args.precisions:
        diff = images[precision] - ref
        print(f"| {precision} | {rates[precision]:.1f} | {diff.abs().max():.3e} | {diff.pow(2).mean().sqrt():.3e} "
              f"| {diff.abs().max() / rms:.3e} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["cpu", "gpu", "all"], default="all")
    p.add_argument("--cpu-teacher", default="mixture")
    p.add_argument("--cpu-seeds", default="0-255")
    p.add_argument("--cpu-batch", type=int, default=32)
    p.add_argument("--cpu-shard-size", type=int, default=32)
    p.add_argument("--teacher", default=None, help="GPU teacher (default: the CIFAR-10 network with random weights)")
    p.add_argument("--gpu-seeds", default="0-4095")
    p.add_argument("--gpu-batch", type=int, default=512)
    p.add_argument("--precisions", nargs="+", default=["fp32", "tf32", "bf16"], choices=["fp32", "tf32", "bf16"])
    args = p.parse_args()
    print(f"bench/datagen.py: {datetime.date.today()}, torch {torch.__version__}, python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="get-bench-datagen-") as tmp:
        if args.part in ("cpu", "all"):
            cpu_part(args, Path(tmp))
        if args.part in ("gpu", "all"):
            gpu_part(args, Path(tmp))


if __name__ == "__main__":
    main()
